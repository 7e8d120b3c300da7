//! Cases and checks shared by tests/gpu*.rs (on a GPU) and tests/emulate.rs (the emulator).
#![allow(dead_code)] // each test file uses part of it

pub mod decode_tables;
pub mod device;
pub mod emu;
pub mod emulated;

use flashattn_core::testing::{
    backend_or_skip, check_backend, check_backward, check_cases, CheckReport,
};
use flashattn_core::{
    lse_max_error, random_inputs, reference_attention, rel_l2_error, AttentionSpec, Backend, DType,
    ForwardInputs, Pass, Tensor,
};
use flashattn_cuda::{CudaBackend, KernelKind};
use std::time::Instant;

/// Runs every case with core's `check_backend` and fails with one line per failing case.
pub fn run(b: &dyn Backend, what: &str, cases: &[(String, AttentionSpec)], seed: u64) {
    run_check(b, what, cases, seed, check_backend);
}

/// The same with core's `check_backward` (forward for out and LSE, then dq, dk, dv).
pub fn run_backward(b: &dyn Backend, what: &str, cases: &[(String, AttentionSpec)], seed: u64) {
    run_check(b, what, cases, seed, check_backward);
}

pub type Check = fn(&dyn Backend, &AttentionSpec, u64) -> Result<CheckReport, String>;

/// Runs every case with `check` and fails with one line per failing case.
pub fn run_check(
    b: &dyn Backend,
    what: &str,
    cases: &[(String, AttentionSpec)],
    seed: u64,
    check: Check,
) {
    let start = Instant::now();
    let failures = check_cases(b, cases, seed, check);
    println!(
        "{what} on {}: {} cases, {} failed, {:.1} s",
        b.device(),
        cases.len(),
        failures.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
}

/// The same cases with `deterministic` asked (the backward's fixed-order dq pass).
pub fn deterministic(cases: Vec<(String, AttentionSpec)>) -> Vec<(String, AttentionSpec)> {
    cases
        .into_iter()
        .map(|(n, s)| (format!("{n} deterministic"), s.deterministic(true)))
        .collect()
}

pub fn named(cases: Vec<(&'static str, AttentionSpec)>) -> Vec<(String, AttentionSpec)> {
    cases.into_iter().map(|(n, s)| (n.to_string(), s)).collect()
}

/// Shapes core's feature cases miss, for the mma.sync kernel: head dims that are not a
/// multiple of 8 (element-wise loads, odd head_dim_v stores), every bucket from 32 to 256,
/// head_dim_v != head_dim both ways, many key blocks, a block of fully masked rows.
pub fn mma_cases(dtype: DType) -> Vec<(String, AttentionSpec)> {
    let base = |b, h, sq, sk, d| {
        AttentionSpec::new(b, h, sq, sk, d)
            .dtype(dtype)
            .return_lse(true)
    };
    let mut v = vec![
        (
            "d 33 / dv 17 (no 16-byte copies)",
            base(1, 2, 21, 40, 33).head_dim_v(17),
        ),
        ("d 8", base(1, 1, 17, 33, 8)),
        ("d 96 / dv 160", base(1, 1, 30, 70, 96).head_dim_v(160)),
        ("d 256 / dv 32", base(1, 1, 20, 50, 256).head_dim_v(32)),
        ("many key blocks", base(1, 1, 3, 1500, 64).causal(true)),
        (
            "masked row blocks",
            base(1, 1, 200, 20, 64).causal(true).window(3, -1),
        ),
    ];
    for d in [128, 160, 192] {
        v.push(("bucket", base(1, 2, 40, 90, d).window(30, 10)));
    }
    v.into_iter()
        .map(|(n, s)| (format!("{n} d{}", s.head_dim), s))
        .collect()
}

/// Puts a NaN into one key (key 7 of kv head 0) or one query row (row 5 of head 0) of a
/// one-sequence `spec` and checks that exactly the rows that see it give NaN out (and NaN LSE
/// when `lse_nan`), as the reference and FlashAttention do, and every other row stays exact.
pub fn check_nan(
    b: &dyn Backend,
    spec: &AttentionSpec,
    nan_in_q: bool,
    lse_nan: bool,
) -> Result<(), String> {
    let (q, k, v) = random_inputs(spec, 7);
    let (mut qv, mut kv) = (q.to_f32_vec(), k.to_f32_vec());
    let (d, hq, hkv) = (spec.head_dim, spec.heads_q, spec.heads_kv);
    if nan_in_q {
        qv[(5 * hq) * d + 3] = f32::NAN;
    } else {
        kv[(7 * hkv) * d + 1] = f32::NAN;
    }
    let q = Tensor::from_f32(spec.dtype, &qv);
    let k = Tensor::from_f32(spec.dtype, &kv);
    let got = b
        .forward(spec, ForwardInputs::of(&q, &k, &v))
        .map_err(|e| e.to_string())?;
    let want =
        reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).map_err(|e| e.to_string())?;
    let out = got.out.to_f32_vec();
    let lse = got.lse.ok_or("no lse")?;
    let dv = spec.head_dim_v;
    let (mut nan_rows, mut finite_rows) = (0, 0);
    for i in 0..spec.seqlen_q {
        for h in 0..hq {
            let row = &out[(i * hq + h) * dv..][..dv];
            let want_row = &want.out[(i * hq + h) * dv..][..dv];
            let (l, want_l) = (
                lse[spec.lse_index(0, h, i)],
                want.lse[spec.lse_index(0, h, i)],
            );
            if want_l.is_nan() {
                nan_rows += 1;
                if row.iter().any(|x| !x.is_nan()) || (lse_nan && !l.is_nan()) {
                    return Err(format!(
                        "row {i} head {h} sees the NaN: out {row:?}, lse {l}"
                    ));
                }
            } else {
                finite_rows += 1;
                // Both infinite for NaN in the output or LSE.
                let err = rel_l2_error(row, want_row);
                let lse_err = lse_max_error(&[l], &[want_l]);
                if err > spec.dtype.tolerance() || lse_err > spec.dtype.lse_tolerance() {
                    return Err(format!(
                        "row {i} head {h}: rel L2 {err}, lse {l} vs {want_l}"
                    ));
                }
            }
        }
    }
    if nan_rows == 0 || finite_rows == 0 {
        return Err(format!(
            "the case must have both kinds of rows ({nan_rows} NaN, {finite_rows} finite)"
        ));
    }
    Ok(())
}

/// The NaN cases: a causal problem (rows before key 7 do not see it) with GQA.
pub fn nan_spec(dtype: DType) -> AttentionSpec {
    AttentionSpec::new(1, 2, 20, 20, 64)
        .heads_kv(1)
        .dtype(dtype)
        .causal(true)
        .return_lse(true)
}

/// The CUDA backend on device 0 with `kind` forced (`None`: automatic), or `None` after
/// printing why: no GPU, or this GPU has no kernel of that family for `pass`.
pub fn gpu_backend(kind: Option<KernelKind>, pass: Pass) -> Option<CudaBackend> {
    let mut b = backend_or_skip("cuda", CudaBackend::new)?;
    b.force_kernel(kind);
    if let Some(kind) = kind {
        let dtype = match kind {
            KernelKind::HopperFp8 => DType::Fp8E4m3,
            _ => DType::Bf16,
        };
        let probe = AttentionSpec::new(1, 1, 8, 8, 128).dtype(dtype);
        let found = match pass {
            Pass::Backward => b.backward_variant_for(&probe),
            _ => b.variant_for(&probe),
        };
        if let Err(e) = found {
            println!("SKIP {kind:?} {} on {}: {e}", pass.name(), b.device());
            return None;
        }
    }
    Some(b)
}

/// Shapes that cross block, stage and tile boundaries of the Hopper kernel (and of the others).
pub fn pipeline_cases(dtype: DType, dims: &[usize]) -> Vec<(String, AttentionSpec)> {
    let mut v = Vec::new();
    for &d in dims {
        let base = |b, h, sq, sk| {
            AttentionSpec::new(b, h, sq, sk, d)
                .dtype(dtype)
                .return_lse(true)
        };
        let cases = [
            ("many blocks", base(2, 3, 300, 700)),
            ("causal", base(1, 2, 513, 513).causal(true)),
            ("causal sq<sk", base(1, 2, 130, 400).causal(true)),
            ("window", base(1, 2, 400, 400).window(100, 37)),
            ("gqa", base(2, 8, 200, 333).heads_kv(2)),
            ("softcap", base(1, 2, 200, 260).softcap(8.0)),
            (
                "alibi causal",
                base(1, 2, 260, 260)
                    .causal(true)
                    .alibi(vec![0.1, 0.03], false),
            ),
            (
                "varlen",
                base(1, 4, 700, 900)
                    .heads_kv(2)
                    .varlen(vec![0, 5, 300, 700], vec![0, 128, 129, 900]),
            ),
            (
                "varlen causal empty seq",
                base(1, 2, 400, 500)
                    .varlen(vec![0, 0, 200, 400], vec![0, 100, 100, 500])
                    .causal(true),
            ),
            // More tiles than SMs: the persistent loop and the Q reuse barrier.
            ("many tiles", base(4, 40, 256, 128)),
        ];
        v.extend(cases.map(|(n, s)| (format!("d{d} {n}"), s)));
    }
    v
}

/// Tens of thousands of keys: prefill-like and decode-like (one query), causal and not.
pub fn long_cases(dtype: DType, d: usize) -> Vec<(String, AttentionSpec)> {
    let base = |sq, sk| {
        AttentionSpec::new(1, 2, sq, sk, d)
            .dtype(dtype)
            .return_lse(true)
    };
    named(vec![
        ("30k keys", base(130, 30_000)),
        ("30k keys causal", base(130, 30_000).causal(true)),
        ("1 query x 100k keys", base(1, 100_000)),
        ("window over 40k keys", base(300, 40_000).window(2000, 0)),
    ])
}
