//! Without a GPU: what `decode_device_with_tables` relies on, on the CPU emulator. The launch
//! and `DecodeParams` come from `decode_plan_from_bounds` on a host spec that knows only a
//! bound of the cache lengths (`decode_bounds`, 300) and holds zero ALiBi slopes and zero
//! rotary tables, while the kernels read the real lengths (0, 1, 17, 129), slopes and whole
//! rotary tables from their tables (the driver's files, as the caller's device tables would
//! be). Core's `check_decode` compares out, LSE (-inf where a row sees no key) and both caches
//! after the append with the f64 reference of the real problem. Contiguous and paged caches,
//! with and without ALiBi and rotary, several splits (some empty). Needs a C++20 compiler;
//! skips with the reason without one, unless FLASHATTN_REQUIRE_BACKENDS names cuda-emulate.

mod common;

use common::emulated::Emulated;
use flashattn_core::testing::decode::{contiguous, paged, rotary, spec, DecodeData};
use flashattn_core::testing::{backend_or_skip, check_decode};
use flashattn_core::{
    rel_l2_error, AttentionSpec, Backend, DType, DecodeInputs, Error, ForwardInputs, Output, Result,
};
use flashattn_cuda::{decode_bounds, decode_plan_from_bounds, select_decode, KernelKind};

const REAL: [i32; 4] = [0, 1, 17, 129];
const BOUND: usize = 300;

/// The host spec of `real`: every length replaced by the bound, ALiBi slopes and rotary
/// tables zeroed (a kernel that read them would not match the real problem).
fn host_of(real: &AttentionSpec) -> AttentionSpec {
    let mut host = real.clone();
    let cache = host.kv_cache.as_mut().expect("a decode spec");
    cache.seqlens = decode_bounds(cache.seqlens.len(), BOUND).unwrap();
    if let Some(r) = &mut cache.rotary {
        r.cos.fill(0.0);
        r.sin.fill(0.0);
    }
    if let Some(a) = &mut host.alibi {
        a.slopes.fill(0.0);
    }
    host
}

/// The emulated kernels planned from bounds: `decode` of a real spec runs the plan of its
/// host spec on the real spec's tables.
struct FromBounds(Emulated);

impl FromBounds {
    fn decode_from_bounds(&self, real: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
        let host = host_of(real);
        let c = host.validate()?;
        let smem = flashattn_cuda::smem_optin_of_arch(self.0.arch);
        let variant = select_decode(&c, (8, 0), smem, self.0.kind)
            .map_err(|e| Error::unsupported("cuda-emulate", e))?;
        let plan = decode_plan_from_bounds(&c, &variant, self.0.sm_count)?;
        if plan.params.num_splits < 2 {
            return Err(Error::invalid(
                "case",
                real,
                "the bound must split the keys",
            ));
        }
        let cache = real.kv_cache.as_ref().unwrap();
        let mut tables = plan.tables.clone();
        tables.seqlens = cache.seqlens.clone();
        tables.alibi = real
            .alibi
            .as_ref()
            .map_or_else(Vec::new, |a| a.slopes.clone());
        if let Some(r) = &cache.rotary {
            (tables.rot_cos, tables.rot_sin) = (r.cos.clone(), r.sin.clone());
        }
        self.0.run_decode(&host, &plan, &tables, inputs)
    }
}

impl Backend for FromBounds {
    fn name(&self) -> &'static str {
        "cuda-emulate, planned from bounds"
    }

    fn device(&self) -> String {
        self.0.device()
    }

    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.0.supports(spec)
    }

    fn forward(&self, _: &AttentionSpec, _: ForwardInputs<'_>) -> Result<Output> {
        Err(Error::unsupported("cuda-emulate", "decode only"))
    }

    fn decode(&self, spec: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
        self.decode_from_bounds(spec, inputs)
    }
}

/// Real lengths 0, 1, 17, 129 in caches with room for the bound (head dims over 64, whose
/// 64-key blocks the bound splits in 2 or more): contiguous without new rows (entry 0 sees no
/// key: out 0, LSE -inf) with ALiBi per head; paged (page 16) appending 2 rows with rotary
/// (NeoX, 40 of 80) and 3 causal query rows; paged (page 3) appending 1 row with ALiBi
/// per batch, GQA 6/2, and rotary (GPT-J) on part of the head.
fn cases(dtype: DType) -> Vec<(&'static str, AttentionSpec)> {
    let extra = BOUND - 129;
    let slopes = |n: usize| (0..n).map(|i| 0.03 * (i + 1) as f32).collect::<Vec<_>>();
    vec![
        (
            "contiguous, no new rows, ALiBi",
            spec(4, 2, 1, 96, contiguous(&REAL, 0, extra)).alibi(slopes(4), false),
        ),
        (
            "paged 16, 2 new rows, rotary",
            spec(
                4,
                4,
                3,
                80,
                paged(&REAL, 2, 16, extra).rotary(rotary(40, BOUND + 3, false)),
            ),
        ),
        (
            "paged 3, 1 new row, ALiBi per batch, rotary 32 of 72",
            spec(
                6,
                2,
                1,
                72,
                paged(&REAL, 1, 3, extra).rotary(rotary(32, BOUND + 1, true)),
            )
            .alibi(slopes(24), true),
        ),
    ]
    .into_iter()
    .map(|(n, s)| (n, s.dtype(dtype)))
    .collect()
}

/// Every case on `kind` kernels, and a check that the bound's problem differs from the real
/// one (so a kernel that read the host lengths would fail).
fn bounds_plan_reads_the_real_tables(kind: KernelKind, dtype: DType, seed: u64) {
    let Some(emu) = backend_or_skip("cuda-emulate", || Emulated::new("sm_80", kind, 32)) else {
        return;
    };
    let b = FromBounds(emu);
    let mut failures = Vec::new();
    for (i, (name, real)) in cases(dtype).into_iter().enumerate() {
        let seed = seed + i as u64;
        match check_decode(&b, &real, seed) {
            Ok(_) => println!("ok   {kind:?} {dtype} {name}"),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
        let data = DecodeData::random(&real, seed);
        let (want, bound) = (data.reference(&real), data.reference(&host_of(&real)));
        let err = rel_l2_error(&to_f32(&bound.unwrap().out), &want.unwrap().out);
        assert!(
            err > 0.1,
            "{name}: the bound's problem is too close to the real one"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn mma_plan_from_bounds_reads_real_lengths_bf16() {
    bounds_plan_reads_the_real_tables(KernelKind::DecodeMma, DType::Bf16, 700);
}

#[test]
fn simt_plan_from_bounds_reads_real_lengths_f32() {
    bounds_plan_reads_the_real_tables(KernelKind::DecodeSimt, DType::F32, 800);
}
