//! Without a GPU: what `decode_device_with_tables` relies on, on the CPU emulator. The launch
//! and `DecodeParams` come from `decode_plan_from_bounds` on a host spec that knows only a
//! bound of the cache lengths (`decode_bounds`) and holds zero ALiBi slopes and zero rotary
//! tables, while the kernels read the real lengths, slopes and whole rotary tables from their
//! tables (the driver's files, as the caller's device tables would be). Core's `check_decode`
//! compares out, LSE (-inf where a row sees no key) and both caches after the append with the
//! f64 reference of the real problem: real lengths 0, 1, 17, 129 under 300, contiguous and
//! paged, with and without ALiBi and rotary, several splits (some empty); 20000 and 33 under
//! 40000 on a 108-SM plan (dozens of splits, the combine weighing them). NaN in q, a cached K
//! row and a new V row reaches exactly the rows that see it (tests/common/decode_tables.rs).
//! Needs a C++20 compiler; skips with the reason without one, unless
//! FLASHATTN_REQUIRE_BACKENDS names cuda-emulate.

mod common;

use common::decode_tables::{
    check_nans, host_of, long_cases, FromBounds, RunFromBounds, BOUND, LONG_BOUND, REAL,
};
use common::emulated::Emulated;
use flashattn_core::testing::decode::{contiguous, paged, rotary, spec, DecodeData};
use flashattn_core::testing::{backend_or_skip, check_decode};
use flashattn_core::{rel_l2_error, AttentionSpec, DType, DecodeInputs, Error, Output, Result};
use flashattn_cuda::{decode_plan_from_bounds, select_decode, DecodePlan, KernelKind};
use std::time::Instant;

/// The emulated kernels run the plan of the host spec on the real spec's tables.
impl RunFromBounds for Emulated {
    fn device(&self) -> String {
        flashattn_core::Backend::device(self)
    }

    fn run(
        &self,
        real: &AttentionSpec,
        host: &AttentionSpec,
        inputs: DecodeInputs<'_>,
    ) -> Result<Output> {
        let plan = plan_of(self, host)?;
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
        self.run_decode(host, &plan, &tables, inputs)
    }
}

/// The plan `decode_device_with_tables` makes of `host` on `emu`'s GPU.
fn plan_of(emu: &Emulated, host: &AttentionSpec) -> Result<DecodePlan> {
    let c = host.validate()?;
    let smem = flashattn_cuda::smem_optin_of_arch(emu.arch);
    let variant = select_decode(&c, (8, 0), smem, emu.kind)
        .map_err(|e| Error::unsupported("cuda-emulate", e))?;
    decode_plan_from_bounds(&c, &variant, emu.sm_count)
}

/// `kind` kernels on an `arch` GPU of `sm_count` SMs, planned from `bound`.
fn from_bounds(kind: KernelKind, sm_count: usize, bound: usize) -> Option<FromBounds<Emulated>> {
    let emu = backend_or_skip("cuda-emulate", || Emulated::new("sm_80", kind, sm_count))?;
    Some(FromBounds { runner: emu, bound })
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

/// Every case on `b` with core's `check_decode`, and a check that the bound's problem differs
/// from the real one (so a kernel that read the host lengths would fail).
fn check_all(b: &FromBounds<Emulated>, cases: Vec<(&str, AttentionSpec)>, seed: u64) {
    let mut failures = Vec::new();
    let what = b.runner.device();
    for (i, (name, real)) in cases.into_iter().enumerate() {
        let seed = seed + i as u64;
        let start = Instant::now();
        match check_decode(b, &real, seed) {
            Ok(r) => println!(
                "ok   {what} {} {name}: rel L2 {:.2e}, {:.1} s",
                real.dtype,
                r.rel_l2,
                start.elapsed().as_secs_f64()
            ),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
        let data = DecodeData::random(&real, seed);
        let host = host_of(&real, b.bound);
        let (want, bound) = (data.reference(&real), data.reference(&host));
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
    if let Some(b) = from_bounds(KernelKind::DecodeMma, 32, BOUND) {
        check_all(&b, cases(DType::Bf16), 700);
    }
}

#[test]
fn simt_plan_from_bounds_reads_real_lengths_f32() {
    if let Some(b) = from_bounds(KernelKind::DecodeSimt, 32, BOUND) {
        check_all(&b, cases(DType::F32), 800);
    }
}

/// NaN in q, in a cached K row and in a new V row reaches exactly the rows that see it, on
/// both kernel families (the split kernel and the combine).
#[test]
fn nan_reaches_exactly_the_rows_that_see_it_from_bounds() {
    let mut failures = Vec::new();
    for (kind, dtype) in [
        (KernelKind::DecodeMma, DType::Bf16),
        (KernelKind::DecodeSimt, DType::F32),
    ] {
        let Some(b) = from_bounds(kind, 32, BOUND) else {
            return;
        };
        match check_nans(&b, dtype, kind == KernelKind::DecodeMma, 900) {
            Ok(()) => println!("ok   NaN {kind:?} {dtype}"),
            Err(e) => failures.push(format!("{kind:?} {dtype}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Long caches (20000 and 33 real keys under a bound of 40000) on a 108-SM GPU: the bound's
/// plan has dozens of splits, the long entry's keys spread over them, the short one's in the
/// first; the combine weighs them.
fn long_caches(kind: KernelKind, dtype: DType, seed: u64) {
    let Some(b) = from_bounds(kind, 108, LONG_BOUND) else {
        return;
    };
    for (name, real) in long_cases(dtype) {
        let plan = plan_of(&b.runner, &host_of(&real, LONG_BOUND)).unwrap();
        let splits = plan.params.num_splits;
        println!("{kind:?} {name}: {splits} splits");
        assert!(splits >= 32, "{name}: {splits} splits");
    }
    check_all(&b, long_cases(dtype), seed);
}

#[test]
fn mma_long_caches_from_bounds_bf16() {
    long_caches(KernelKind::DecodeMma, DType::Bf16, 1000);
}

#[test]
fn simt_long_caches_from_bounds_f32() {
    long_caches(KernelKind::DecodeSimt, DType::F32, 1100);
}
