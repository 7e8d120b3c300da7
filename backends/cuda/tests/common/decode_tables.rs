//! Decode on device tables, shared by tests/emulate_decode_tables.rs (the emulator) and
//! tests/gpu_decode_tables.rs (a GPU): a [`FromBounds`] backend runs a real spec by the plan of
//! its host spec ([`host_of`]: lengths replaced by a bound, ALiBi slopes and rotary tables
//! zeroed) while the kernels read the real lengths and tables, so core's checks apply as they
//! are; the NaN case and check, and the long-cache cases.

use flashattn_core::testing::decode::{contiguous, paged, rotary, spec, DecodeData};
use flashattn_core::testing::nan::same_nans_and_close;
use flashattn_core::{
    lse_max_error, AttentionSpec, Backend, DType, DecodeInputs, Error, ForwardInputs, Output,
    Result, Tensor,
};
use flashattn_cuda::decode_bounds;

/// Real lengths (an empty entry, one key, part of a block, more than a block) and their bound.
pub const REAL: [i32; 4] = [0, 1, 17, 129];
pub const BOUND: usize = 300;
/// Tens of thousands of keys and a short entry, under a bound twice the longest.
pub const LONG_REAL: [i32; 2] = [20_000, 33];
pub const LONG_BOUND: usize = 40_000;

/// The host spec of `real`: every length replaced by `bound`, ALiBi slopes and rotary tables
/// zeroed (a kernel that read them would not match the real problem).
pub fn host_of(real: &AttentionSpec, bound: usize) -> AttentionSpec {
    let mut host = real.clone();
    let cache = host.kv_cache.as_mut().expect("a decode spec");
    cache.seqlens = decode_bounds(cache.seqlens.len(), bound).expect("a bound that fits int32");
    if let Some(r) = &mut cache.rotary {
        r.cos.fill(0.0);
        r.sin.fill(0.0);
    }
    if let Some(a) = &mut host.alibi {
        a.slopes.fill(0.0);
    }
    host
}

/// Runs a real spec's decode by the plan of its host spec, the kernels reading the real
/// lengths, slopes and rotary tables (what a caller's device tables hold).
pub trait RunFromBounds: Send + Sync {
    fn device(&self) -> String;
    fn run(
        &self,
        real: &AttentionSpec,
        host: &AttentionSpec,
        inputs: DecodeInputs<'_>,
    ) -> Result<Output>;
}

/// A decode-only backend whose `decode(real)` runs `host_of(real, bound)`'s plan.
pub struct FromBounds<R> {
    pub runner: R,
    pub bound: usize,
}

impl<R: RunFromBounds> Backend for FromBounds<R> {
    fn name(&self) -> &'static str {
        "cuda, planned from bounds"
    }

    fn device(&self) -> String {
        self.runner.device()
    }

    fn supports(&self, _: &AttentionSpec) -> Result<()> {
        Ok(())
    }

    fn forward(&self, _: &AttentionSpec, _: ForwardInputs<'_>) -> Result<Output> {
        Err(Error::unsupported("cuda", "decode only"))
    }

    fn decode(&self, spec: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
        self.runner.run(spec, &host_of(spec, self.bound), inputs)
    }
}

/// The NaN case: paged (page 16) with room for [`BOUND`], real lengths [`REAL`], 2 new rows,
/// 3 causal query rows, GQA 4/2, head_dim 72 (64-key blocks: the bound splits them).
pub fn nan_spec(dtype: DType) -> AttentionSpec {
    spec(4, 2, 3, 72, paged(&REAL, 2, 16, BOUND - 129)).dtype(dtype)
}

/// Where the NaNs go: q of (entry 1, query row 1, head 2); cached key 40 of entry 3, KV head 0,
/// element 5; element 7 of new V row 0 of entry 2, KV head 1 (query rows 1 and 2 see it, row 0
/// does not: rows that share a warp in the CUDA-core kernel's tile).
const Q_NAN: (usize, usize, usize) = (1, 1, 2);
const K_NAN: (usize, usize, usize, usize) = (3, 40, 0, 5);
const V_NAN: (usize, usize, usize, usize) = (2, 0, 1, 7);

/// What a row of the NaN case gives, as FlashAttention and the reference define it.
#[derive(Debug, PartialEq)]
enum Row {
    /// Sees no key: out 0, LSE -inf.
    Empty,
    /// Its q or a key it sees is NaN: out and LSE NaN.
    Nan,
    /// Sees a key whose V has a NaN element: that out element NaN, the rest and LSE finite.
    NanAt(usize),
    Finite,
}

/// The row (entry `b`, query row `i`, head `h`) of [`nan_spec`]: causal, so query row i sees
/// the cached keys and new row j when j <= new - seqlen_q + i.
fn expected_row(s: &AttentionSpec, b: usize, i: usize, h: usize) -> Row {
    let c = s.kv_cache.as_ref().unwrap();
    let (new, sq, kvh) = (c.seqlen_new, s.seqlen_q, h / s.group_size());
    let sees_new = |j: usize| j + sq <= new + i;
    let len = c.seqlens[b] as usize;
    if len == 0 && !sees_new(0) {
        Row::Empty
    } else if (b, i, h) == Q_NAN || (b == K_NAN.0 && kvh == K_NAN.2) {
        Row::Nan
    } else if b == V_NAN.0 && kvh == V_NAN.2 && sees_new(V_NAN.1) {
        Row::NanAt(V_NAN.3)
    } else {
        Row::Finite
    }
}

/// [`nan_spec`]'s random data with the NaNs planted.
fn nan_data(s: &AttentionSpec, seed: u64) -> DecodeData {
    let c = s.kv_cache.as_ref().unwrap();
    let (d, hq, hkv, new) = (s.head_dim, s.heads_q, s.heads_kv, c.seqlen_new);
    let mut data = DecodeData::random(s, seed);
    let with_nan = |t: &Tensor, at: usize| {
        let mut v = t.to_f32_vec();
        v[at] = f32::NAN;
        Tensor::from_f32(t.dtype(), &v)
    };
    let (b, i, h) = Q_NAN;
    data.q = with_nan(&data.q, ((b * s.seqlen_q + i) * hq + h) * d + 3);
    let (b, pos, kvh, x) = K_NAN;
    data.k_cache = with_nan(&data.k_cache, (c.row(b, pos) * hkv + kvh) * d + x);
    let (b, j, kvh, x) = V_NAN;
    data.v_new = with_nan(&data.v_new, ((b * new + j) * hkv + kvh) * s.head_dim_v + x);
    data
}

/// What the reference gives in a row of out `w` and LSE `l`, if one of [`Row`].
fn reference_row(w: &[f64], l: f64) -> Option<Row> {
    let nans: Vec<usize> = (0..w.len()).filter(|&x| w[x].is_nan()).collect();
    match nans.as_slice() {
        _ if l == f64::NEG_INFINITY && w.iter().all(|&x| x == 0.0) => Some(Row::Empty),
        n if l.is_nan() && n.len() == w.len() => Some(Row::Nan),
        &[x] if l.is_finite() => Some(Row::NanAt(x)),
        [] if l.is_finite() => Some(Row::Finite),
        _ => None,
    }
}

/// NaN in, NaN out on `b`: NaNs in one q row, one cached K row and one new V row reach exactly
/// the rows that see them (the reference says which, and must agree with [`expected_row`]);
/// every other row, other heads and entries, within the dtype's tolerance of the reference;
/// the row that sees no key gives out 0 and LSE -inf; both caches as the reference's after
/// the append (the NaN V row where it belongs). `block_leak`: the tensor-core kernels, whose
/// P V over a key block gives 0 x NaN = NaN in the rows of that block that mask the NaN V
/// row (documented in the README, as FlashAttention's): that one element of those rows may be
/// NaN, the rest of the row and its LSE must still match.
pub fn check_nans(
    b: &dyn Backend,
    dtype: DType,
    block_leak: bool,
    seed: u64,
) -> std::result::Result<(), String> {
    let s = nan_spec(dtype);
    let data = nan_data(&s, seed);
    let want = data.reference(&s).map_err(|e| format!("reference: {e}"))?;
    let (mut kc, mut vc) = (data.k_cache.clone(), data.v_cache.clone());
    let got = b
        .decode(&s, data.inputs((&mut kc, &mut vc)))
        .map_err(|e| format!("{s}: {e}"))?;
    let (mut out, lse) = (got.out.to_f32_vec(), got.lse.ok_or("no LSE")?);
    let (dv, group) = (s.head_dim_v, s.group_size());
    for bi in 0..s.batch {
        for i in 0..s.seqlen_q {
            for h in 0..s.heads_q {
                let what = format!("entry {bi}, query row {i}, head {h}");
                let at = ((bi * s.seqlen_q + i) * s.heads_q + h) * dv;
                let (w, l) = (&want.out[at..at + dv], want.lse[s.lse_index(bi, h, i)]);
                let row = expected_row(&s, bi, i, h);
                if reference_row(w, l).as_ref() != Some(&row) {
                    return Err(format!(
                        "{what}: the case says {row:?}, the reference gives lse {l}, out {w:?}"
                    ));
                }
                let got = &mut out[at..at + dv];
                if row == Row::Empty && got.iter().any(|&x| x != 0.0) {
                    return Err(format!("{what} sees no key: out {got:?}"));
                }
                let leak = bi == V_NAN.0 && h / group == V_NAN.2;
                if block_leak && leak && row == Row::Finite && got[V_NAN.3].is_nan() {
                    got[V_NAN.3] = w[V_NAN.3] as f32; // 0 x NaN in its key block, excused
                }
                same_nans_and_close(got, w, dtype.tolerance())
                    .map_err(|e| format!("{what} ({row:?}): out {e}"))?;
            }
        }
    }
    // NaN and -inf where the reference has them; the finite LSEs within the LSE bound.
    same_nans_and_close(&lse, &want.lse, f64::INFINITY).map_err(|e| format!("lse: {e}"))?;
    let finite: (Vec<f32>, Vec<f64>) = lse
        .iter()
        .zip(&want.lse)
        .filter(|(_, w)| w.is_finite())
        .unzip();
    let err = lse_max_error(&finite.0, &finite.1);
    if err > dtype.lse_tolerance() {
        return Err(format!("finite LSEs: max error {err:.3e}"));
    }
    for (name, got, w) in [("k", &kc, &want.k_cache), ("v", &vc, &want.v_cache)] {
        same_nans_and_close(&got.to_f32_vec(), w, dtype.tolerance())
            .map_err(|e| format!("{name} cache after the append: {e}"))?;
    }
    Ok(())
}

/// Long caches ([`LONG_REAL`] under [`LONG_BOUND`]), GQA 2/1: contiguous, 1 new row, head_dim
/// 64, scale 1 (a peaked softmax, whose few heavy keys lie in any split: near-uniform weights
/// over 20000 keys would give an output too small to weigh against the short entry's);
/// paged (page 256), 2 new rows and 2 causal query rows, rotary on 32 of 72, ALiBi on one head.
/// Many splits: the long entry's keys over all of them, the short one's in the first.
pub fn long_cases(dtype: DType) -> Vec<(&'static str, AttentionSpec)> {
    let extra = LONG_BOUND - LONG_REAL[0] as usize;
    let rot = rotary(32, LONG_BOUND + 2, false);
    vec![
        (
            "long contiguous, 1 new row",
            spec(2, 1, 1, 64, contiguous(&LONG_REAL, 1, extra)).scale(1.0),
        ),
        (
            "long paged 256, 2 new rows, rotary, ALiBi",
            spec(2, 1, 2, 72, paged(&LONG_REAL, 2, 256, extra).rotary(rot))
                .alibi(vec![0.001, 0.0], false),
        ),
    ]
    .into_iter()
    .map(|(n, s)| (n, s.dtype(dtype)))
    .collect()
}
