//! Without a GPU: the mma.sync kernel's and the portable kernel's real CUDA source, run on the
//! CPU by a small emulator (tests/emulator/emu.h: one fiber per CUDA thread; ldmatrix,
//! mma.sync and shuffles computed from every lane's operands with the PTX ISA's fragment
//! layouts; cp.async landing at its wait), against the f64 reference through core's test kit.
//! The host side is the backend's own: variant selection (`select_mma` / `select_generic`),
//! `KernelParams` and the launch (`flash_launch`). What this cannot show: speed, races between
//! warps, and the real hardware's instruction semantics beyond the documented layouts.
//! Needs a C++20 compiler (`$CXX`, else `c++`); skips with the reason without one, unless
//! FLASHATTN_REQUIRE_BACKENDS names cuda-emulate.

mod common;

use common::emu::{build_binary, run_dir, run_with_limit, sources_for_emulator};
use common::emulated::Emulated;
use common::{check_nan, deterministic, mma_cases, named, nan_spec, run, run_backward};
use flashattn_core::testing::strategy::{specs, SpecSpace};
use flashattn_core::testing::{backend_or_skip, check_backend, feature_cases, nan};
use flashattn_core::{AttentionSpec, DType};
use flashattn_cuda::{Fp8Tables, KernelKind, KernelParams};
use std::sync::OnceLock;
use std::time::Duration;

/// The forward driver, for the FP8 V transpose's standalone binary.
const DRIVER: &str = include_str!("emulator/driver.cpp");

fn emulated(arch: &'static str, kind: KernelKind) -> Option<Emulated> {
    backend_or_skip("cuda-emulate", || Emulated::new(arch, kind, 0))
}

/// Core's feature cases of `dtype` (and the mma.sync kernel's own shapes) on `kind` kernels as
/// an `arch` GPU picks them.
fn forward_cases(arch: &'static str, kind: KernelKind, dtype: DType, seed: u64) {
    let Some(b) = emulated(arch, kind) else {
        return;
    };
    run(&b, "feature cases", &named(feature_cases(dtype)), seed);
    if kind == KernelKind::Mma {
        run(&b, "mma cases", &mma_cases(dtype), seed + 100);
    }
}

#[test]
fn mma_kernel_feature_cases_bf16_sm80_tiles() {
    forward_cases("sm_80", KernelKind::Mma, DType::Bf16, 100);
}

#[test]
fn mma_kernel_feature_cases_f16_sm86_tiles() {
    forward_cases("sm_86", KernelKind::Mma, DType::F16, 300);
}

#[test]
fn portable_kernel_feature_cases_f32() {
    forward_cases("sm_80", KernelKind::Generic, DType::F32, 500);
}

#[test]
fn nan_reaches_exactly_the_rows_that_see_it() {
    for (kind, dtype) in [
        (KernelKind::Mma, DType::Bf16),
        (KernelKind::Generic, DType::F32),
    ] {
        let Some(b) = emulated("sm_80", kind) else {
            return;
        };
        for nan_in_q in [false, true] {
            if let Err(e) = check_nan(&b, &nan_spec(dtype), nan_in_q, true) {
                panic!(
                    "{kind:?} {dtype}, NaN in {}: {e}",
                    if nan_in_q { "q" } else { "k" }
                );
            }
        }
    }
}

/// The key (within its 32-key group) whose P value `to_p` (hopper_fwd.cu) packs into logical
/// column `l` of an 8-bit wgmma A operand: byte y of register 2h holds row g's accumulators
/// 8h + {0, 1, 4, 5}[y] (PTX ISA layouts: A column 16h + 4t + y; accumulator v at column
/// 8 (v / 4) + 2t + v % 2 for lane t = lane % 4).
fn p_order_key(l: usize) -> usize {
    let (h, t, y) = (l / 16, (l / 4) % 4, l % 4);
    let v = 8 * h + [0, 1, 4, 5][y];
    8 * (v / 4) + 2 * t + v % 2
}

/// The FP8 V transpose (kernels/fp8_vt.cu, the only FP8 code that runs without a GPU): every
/// Vt byte of every (KV head, dim, sequence) holds the key `to_p` puts in that column, and zero
/// past the sequence's keys up to its padded end; no byte is left unwritten.
#[test]
fn fp8_v_transpose_writes_vt_in_p_register_order() {
    let Some(b) = emulated("sm_90a", KernelKind::HopperFp8) else {
        return;
    };
    let fp8 = DType::Fp8E4m3;
    let cases = [
        AttentionSpec::new(2, 6, 40, 300, 128)
            .heads_kv(3)
            .dtype(fp8),
        AttentionSpec::new(1, 2, 10, 300, 256)
            .dtype(fp8)
            .varlen(vec![0, 5, 5, 10], vec![0, 1, 1, 290]),
    ];
    let sources = KernelKind::HopperFp8.def().sources;
    let vt_sources: Vec<_> = sources
        .iter()
        .copied()
        .filter(|(f, _)| ["params.cuh", "fp8_vt.cu"].contains(f))
        .collect();
    for spec in cases {
        let (hkv, d) = (spec.heads_kv, spec.head_dim);
        let checked = spec.validate().unwrap();
        let tables = Fp8Tables::new(&checked).unwrap();
        let launch = tables.transpose_launch(hkv, d).unwrap().unwrap();
        let defines = [
            "-DFA_DTYPE=3".to_string(),
            format!("-DHEAD_DIM={d}"),
            "-DEMU_KERNEL=fa_fp8_transpose_v".into(),
            "-DEMU_FP8_VT".into(),
            "-DEMU_SMEM_T=uint32_t".into(),
        ];
        let source = sources_for_emulator(&vt_sources) + DRIVER;
        let bin = build_binary(&b.drivers.dir, &format!("fp8_vt_d{d}"), &source, &defines).unwrap();
        let dir = run_dir(&b.drivers.dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
        let params = KernelParams::new(&checked, 128).unwrap();
        let v: Vec<u8> = (0..checked.sizes.v)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8 | 1)
            .collect();
        let vt_bytes = tables.vt_keys() * hkv * d;
        let (g, t) = (launch.grid, launch.block);
        write("params.bin", bytemuck::bytes_of(&params));
        write(
            "launch.txt",
            format!("{} {} {} {t} {vt_bytes} 0", g.0, g.1, g.2).as_bytes(),
        );
        write("q.bin", &[]);
        write("k.bin", &[]);
        write("v.bin", &v);
        write("vt_start.bin", bytemuck::cast_slice(&tables.vt_start));
        if let Some(vl) = &spec.varlen {
            write("cu_q.bin", bytemuck::cast_slice(&vl.cu_seqlens_q));
            write("cu_k.bin", bytemuck::cast_slice(&vl.cu_seqlens_k));
        }
        run_with_limit(&bin, &dir, Duration::from_secs(300)).unwrap();
        let vt = std::fs::read(dir.join("out.bin")).unwrap();
        assert_eq!(vt.len(), vt_bytes);
        let row = tables.vt_keys();
        for s in 0..spec.batch {
            let seq = spec.seq(s);
            let (start, end) = (tables.vt_start[s] as usize, tables.vt_start[s + 1] as usize);
            for h in 0..hkv {
                for dd in 0..d {
                    for col in start..end {
                        let rel = col - start;
                        let key = rel / 32 * 32 + p_order_key(rel % 32);
                        let want = if key < seq.k_len {
                            v[((seq.k_start + key) * hkv + h) * d + dd]
                        } else {
                            0
                        };
                        let got = vt[(h * d + dd) * row + col];
                        assert_eq!(got, want, "d{d} seq {s} head {h} dim {dd} column {col}");
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 10,
        failure_persistence: None,
        ..Default::default()
    })]
    /// Core's random specs (every head dim, GQA, masks, softcap, ALiBi, varlen) on the mma.sync
    /// kernel, as an sm_80 GPU would run them.
    #[test]
    fn mma_kernel_random_specs(
        spec in specs(SpecSpace { max_seqlen: 100, ..SpecSpace::new(&[DType::Bf16, DType::F16]) }),
        seed in proptest::prelude::any::<u64>(),
    ) {
        static B: OnceLock<Option<Emulated>> = OnceLock::new();
        let Some(b) = B.get_or_init(|| emulated("sm_80", KernelKind::Mma)) else {
            return Ok(());
        };
        if let Err(e) = check_backend(b, &spec, seed) {
            proptest::prop_assert!(false, "{}", e);
        }
    }
}

/// The cases of `cases` named in `names` (each must exist): the emulator runs the backward
/// slowly (a fiber per thread), so each test takes a few cases that cover its kernel's paths.
fn pick(cases: Vec<(String, AttentionSpec)>, names: &[&str]) -> Vec<(String, AttentionSpec)> {
    let picked: Vec<_> = cases
        .into_iter()
        .filter(|(n, _)| names.contains(&n.as_str()))
        .collect();
    assert_eq!(picked.len(), names.len(), "a case of {names:?} is missing");
    picked
}

/// The backward of `kind` kernels as `arch` picks them, on `dtype`'s feature cases: those named
/// in `atomic` (plus `extra`) with dq by atomics, those named in `det` with the deterministic
/// dq pass.
fn backward_cases(
    (arch, kind, dtype): (&'static str, KernelKind, DType),
    extra: Vec<(String, AttentionSpec)>,
    atomic: &[&str],
    det: &[&str],
    seed: u64,
) {
    let Some(b) = emulated(arch, kind) else {
        return;
    };
    let features = named(feature_cases(dtype));
    let mut cases = extra;
    cases.extend(pick(features.clone(), atomic));
    run_backward(&b, "backward", &cases, seed);
    let det = deterministic(pick(features, det));
    run_backward(&b, "backward, deterministic", &det, seed + 10);
}

/// The mma.sync backward with sm_80's tiles (64 x 128 keys on 8 warps, double-buffered Q/dO;
/// two warps per key tile at head_dim 256), bf16: dq by atomics on odd sizes, fully masked
/// rows, GQA, softcap, ALiBi with causal, varlen, head_dim_v != head_dim; the deterministic dq
/// pass on a window over varlen and MQA causal.
#[test]
fn mma_backward_bf16_sm80_tiles() {
    let atomic = [
        "odd sizes",
        "causal sq>sk (masked rows)",
        "gqa",
        "softcap",
        "alibi per batch + causal",
        "varlen",
        "head_dim_v differs",
    ];
    let det = ["varlen window", "mqa causal"];
    let kind = ("sm_80", KernelKind::Mma, DType::Bf16);
    backward_cases(kind, Vec::new(), &atomic, &det, 800);
}

/// The same with the smaller tiles of 99 KiB GPUs (sm_86/sm_89: one Q/dO buffer at head_dim
/// 128, 32 x 32 keys at 256), f16: odd head dims (d 33 / dv 17: element-wise copies; 72),
/// window with causal;
/// deterministic at head_dim 256 and causal with fewer queries than keys.
#[test]
fn mma_backward_f16_sm86_tiles() {
    let odd = pick(
        mma_cases(DType::F16),
        &["d 33 / dv 17 (no 16-byte copies) d33"],
    );
    let atomic = ["head_dim 72", "window + causal"];
    let det = ["head_dim 256", "causal sq<sk"];
    backward_cases(
        ("sm_86", KernelKind::Mma, DType::F16),
        odd,
        &atomic,
        &det,
        820,
    );
}

/// The portable backward (f32 problems), both dq modes.
#[test]
fn portable_backward_f32() {
    let atomic = ["odd sizes", "softcap", "alibi", "varlen"];
    let kind = ("sm_80", KernelKind::Generic, DType::F32);
    backward_cases(kind, Vec::new(), &atomic, &["gqa", "window"], 840);
}

/// NaN in one key reaches exactly its head group's gradients (core's shared check): the
/// mma.sync backward (bf16) and the portable one (f32).
#[test]
fn backward_nan_stays_in_its_head_group() {
    for (kind, dtype) in [
        (KernelKind::Mma, DType::Bf16),
        (KernelKind::Generic, DType::F32),
    ] {
        if let Some(b) = emulated("sm_80", kind) {
            nan::backward_nan_stays_in_its_head_group(&b, dtype)
                .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        }
    }
}
