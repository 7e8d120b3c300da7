//! candle-flash-attn's functions, same names and signatures, on flashattn (plus the LSE forms).
//!
//! Dense: q `(batch, seqlen_q, heads_q, head_dim)`, k `(batch, seqlen_k, heads_kv, head_dim)`,
//! v `(batch, seqlen_k, heads_kv, head_dim_v)`, out `(batch, seqlen_q, heads_q, head_dim_v)`.
//! Varlen: `(total_tokens, heads, head_dim)` with cumulative `seqlens_*` (`batch + 1` integers).
//! Windows: `None` is unbounded, `(None, Some(0))` is the causal mask; both are bottom-right
//! aligned (query i sees key j iff `j <= i + seqlen_k - seqlen_q`), as in FlashAttention.
//! `softcap` 0 is off. Any strides are accepted; transposed and narrowed views reach the CPU
//! backend as strides over candle's storage, without a copy.

use crate::op::{FlashAttnOp, Params, VarlenArgs};
use candle_core::{bail, DType, Result, Tensor};

fn causal_window(causal: bool) -> (Option<usize>, Option<usize>) {
    (None, causal.then_some(0))
}

/// ALiBi slopes on the host: `[heads_q]`, or `[batch, heads_q]` (then `true`).
fn alibi_slopes(t: Option<&Tensor>) -> Result<Option<(Vec<f32>, bool)>> {
    let Some(t) = t else { return Ok(None) };
    if t.dtype() != DType::F32 {
        bail!("flashattn: alibi_slopes are {:?}; expected f32", t.dtype());
    }
    match t.rank() {
        1 => Ok(Some((t.to_vec1()?, false))),
        2 => Ok(Some((t.flatten_all()?.to_vec1()?, true))),
        _ => bail!(
            "flashattn: alibi_slopes have shape {:?}; expected (heads_q) or (batch, heads_q)",
            t.shape()
        ),
    }
}

/// Cumulative sequence lengths on the host, as i32 (FlashAttention's type).
fn cu_seqlens(name: &str, t: &Tensor) -> Result<Vec<i32>> {
    if !t.dtype().is_int() || t.rank() != 1 {
        bail!(
            "flashattn: {name} is {:?} of shape {:?}; expected a 1-D integer tensor (batch + 1 offsets)",
            t.dtype(),
            t.shape()
        );
    }
    let values = t.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            i32::try_from(x).map_err(|_| {
                candle_core::Error::msg(format!("flashattn: {name}[{i}] = {x} does not fit in i32"))
            })
        })
        .collect()
}

fn dense(
    alibi: Option<&Tensor>,
    softmax_scale: f32,
    (window_size_left, window_size_right): (Option<usize>, Option<usize>),
    softcap: f32,
) -> Result<Params> {
    Ok(Params {
        softmax_scale,
        window_size_left,
        window_size_right,
        softcap,
        alibi: alibi_slopes(alibi)?,
        varlen: None,
    })
}

/// `p` over a variable-length batch: the cumulative `seqlens_*` and the longest lengths.
fn varlen(
    mut p: Params,
    (seqlens_q, seqlens_k): (&Tensor, &Tensor),
    (max_seqlen_q, max_seqlen_k): (usize, usize),
) -> Result<Params> {
    p.varlen = Some(VarlenArgs {
        cu_seqlens_q: cu_seqlens("seqlens_q", seqlens_q)?,
        cu_seqlens_k: cu_seqlens("seqlens_k", seqlens_k)?,
        max_seqlen_q,
        max_seqlen_k,
    });
    Ok(p)
}

fn apply(q: &Tensor, k: &Tensor, v: &Tensor, params: Params) -> Result<Tensor> {
    q.apply_op3(k, v, FlashAttnOp::new(params))
}

/// Runs the op and returns its output and LSE (f32, `lse_shape`; not differentiable).
fn apply_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: Params,
    lse_shape: &[usize],
) -> Result<(Tensor, Tensor)> {
    let op = FlashAttnOp::new(params);
    let slot = op.lse.clone();
    let out = q.apply_op3(k, v, op)?;
    let lse = slot
        .lock()
        .map_err(|_| candle_core::Error::msg("flashattn: the LSE slot's lock is poisoned"))?
        .clone();
    let Some(lse) = lse else {
        bail!("flashattn: the forward returned no LSE");
    };
    let lse = Tensor::from_vec(lse, lse_shape, &candle_core::Device::Cpu)?.to_device(q.device())?;
    Ok((out, lse))
}

/// `softmax(q k^T * softmax_scale) v`, causal (bottom-right aligned) or not.
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    apply(
        q,
        k,
        v,
        dense(None, softmax_scale, causal_window(causal), 0.0)?,
    )
}

/// Sliding-window attention: query i sees keys
/// `[i + sk - sq - left, i + sk - sq + right]`; `None` is unbounded.
pub fn flash_attn_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let window = (window_size_left, window_size_right);
    apply(q, k, v, dense(None, softmax_scale, window, 0.0)?)
}

/// ALiBi: score bias `-slope * |i + sk - sq - j|`; slopes f32 `(heads_q)` or `(batch, heads_q)`.
pub fn flash_attn_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let p = dense(
        Some(alibi_slopes),
        softmax_scale,
        causal_window(causal),
        0.0,
    )?;
    apply(q, k, v, p)
}

/// ALiBi with a sliding window.
pub fn flash_attn_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let window = (window_size_left, window_size_right);
    apply(
        q,
        k,
        v,
        dense(Some(alibi_slopes), softmax_scale, window, 0.0)?,
    )
}

/// Everything: optional ALiBi, window, and softcap `c * tanh(s / c)` (0 is off, not 1).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<Tensor> {
    let window = (window_size_left, window_size_right);
    apply(
        q,
        k,
        v,
        dense(alibi_slopes, softmax_scale, window, softcap)?,
    )
}

/// As [`flash_attn_alibi_windowed_softcap`], also returning the LSE, f32
/// `(batch, heads_q, seqlen_q)` (natural log; `-inf` for a row that sees no key).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<(Tensor, Tensor)> {
    let window = (window_size_left, window_size_right);
    let (b, sq, hq, _) = q.dims4()?;
    let p = dense(alibi_slopes, softmax_scale, window, softcap)?;
    apply_with_lse(q, k, v, p, &[b, hq, sq])
}

/// Variable-length batch, causal or not. `seqlens_*` hold `batch + 1` cumulative offsets
/// (any integer dtype); `max_seqlen_*` must be at least the longest sequence.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let p = dense(None, softmax_scale, causal_window(causal), 0.0)?;
    let p = varlen(p, (seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))?;
    apply(q, k, v, p)
}

/// Variable-length batch with a sliding window.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let p = dense(
        None,
        softmax_scale,
        (window_size_left, window_size_right),
        0.0,
    )?;
    let p = varlen(p, (seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))?;
    apply(q, k, v, p)
}

/// Variable-length batch with ALiBi.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let p = dense(
        Some(alibi_slopes),
        softmax_scale,
        causal_window(causal),
        0.0,
    )?;
    let p = varlen(p, (seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))?;
    apply(q, k, v, p)
}

/// Variable-length batch with ALiBi and a sliding window.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let p = dense(
        Some(alibi_slopes),
        softmax_scale,
        (window_size_left, window_size_right),
        0.0,
    )?;
    let p = varlen(p, (seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))?;
    apply(q, k, v, p)
}

/// Variable-length batch with everything: optional ALiBi, window, softcap (0 is off).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<Tensor> {
    let p = dense(
        alibi_slopes,
        softmax_scale,
        (window_size_left, window_size_right),
        softcap,
    )?;
    let p = varlen(p, (seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))?;
    apply(q, k, v, p)
}

/// As [`flash_attn_varlen_alibi_windowed_softcap`], also returning the LSE, f32
/// `(heads_q, total_q)` (FlashAttention's varlen layout).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<(Tensor, Tensor)> {
    let (tq, hq, _) = q.dims3()?;
    let p = dense(
        alibi_slopes,
        softmax_scale,
        (window_size_left, window_size_right),
        softcap,
    )?;
    let p = varlen(p, (seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))?;
    apply_with_lse(q, k, v, p, &[hq, tq])
}
