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

/// One call's options: every public function below is this builder with some fields set,
/// so each is one expression and the options are turned into [`Params`] in one place.
#[derive(Default)]
struct Call<'a> {
    alibi: Option<&'a Tensor>,
    window: (Option<usize>, Option<usize>),
    softcap: f32,
    varlen: Option<Varlen<'a>>,
}

/// The cumulative `seqlens_*` (q, k) and the longest lengths of a variable-length batch.
struct Varlen<'a> {
    seqlens: (&'a Tensor, &'a Tensor),
    max_seqlens: (usize, usize),
}

impl<'a> Call<'a> {
    fn window(window_size_left: Option<usize>, window_size_right: Option<usize>) -> Self {
        Call {
            window: (window_size_left, window_size_right),
            ..Call::default()
        }
    }

    fn causal(causal: bool) -> Self {
        Call::window(None, causal.then_some(0))
    }

    fn alibi(self, alibi: Option<&'a Tensor>) -> Self {
        Call { alibi, ..self }
    }

    fn softcap(self, softcap: f32) -> Self {
        Call { softcap, ..self }
    }

    fn varlen(self, seqlens: (&'a Tensor, &'a Tensor), max_seqlens: (usize, usize)) -> Self {
        Call {
            varlen: Some(Varlen {
                seqlens,
                max_seqlens,
            }),
            ..self
        }
    }

    fn params(self, softmax_scale: f32) -> Result<Params> {
        // The slopes are read before the offsets: the first error reported stays the same.
        let alibi = alibi_slopes(self.alibi)?;
        let varlen = match self.varlen {
            None => None,
            Some(Varlen {
                seqlens: (seqlens_q, seqlens_k),
                max_seqlens: (max_seqlen_q, max_seqlen_k),
            }) => Some(VarlenArgs {
                cu_seqlens_q: cu_seqlens("seqlens_q", seqlens_q)?,
                cu_seqlens_k: cu_seqlens("seqlens_k", seqlens_k)?,
                max_seqlen_q,
                max_seqlen_k,
            }),
        };
        Ok(Params {
            softmax_scale,
            window_size_left: self.window.0,
            window_size_right: self.window.1,
            softcap: self.softcap,
            alibi,
            varlen,
        })
    }

    fn run(self, (q, k, v): (&Tensor, &Tensor, &Tensor), softmax_scale: f32) -> Result<Tensor> {
        q.apply_op3(k, v, FlashAttnOp::new(self.params(softmax_scale)?))
    }

    /// Runs the op and returns its output and LSE (f32, `lse_shape`; not differentiable).
    fn run_with_lse(
        self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        softmax_scale: f32,
        lse_shape: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        let op = FlashAttnOp::new(self.params(softmax_scale)?);
        let slot = op.lse.clone();
        let out = q.apply_op3(k, v, op)?;
        let lse = slot
            .lock()
            .map_err(|_| candle_core::Error::msg("flashattn: the LSE slot's lock is poisoned"))?
            .clone();
        let Some(lse) = lse else {
            bail!("flashattn: the forward returned no LSE");
        };
        let lse =
            Tensor::from_vec(lse, lse_shape, &candle_core::Device::Cpu)?.to_device(q.device())?;
        Ok((out, lse))
    }
}

/// Defines the public functions from one line each of arguments and a [`Call`]: their
/// argument lists are candle-flash-attn's (fixed for compatibility), every one starting with
/// q, k, v, so the list of them reads as a table instead of twelve repeated signatures.
macro_rules! compat_fns {
    ($(
        $(#[$attr:meta])*
        fn $name:ident($q:ident, $k:ident, $v:ident, $($arg:ident: $ty:ty),* $(,)?) -> $ret:ty
        $body:block
    )*) => {$(
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($q: &Tensor, $k: &Tensor, $v: &Tensor, $($arg: $ty),*) -> Result<$ret>
        $body
    )*};
}

compat_fns! {
    /// `softmax(q k^T * softmax_scale) v`, causal (bottom-right aligned) or not.
    fn flash_attn(q, k, v, softmax_scale: f32, causal: bool) -> Tensor {
        Call::causal(causal).run((q, k, v), softmax_scale)
    }

    /// Sliding-window attention: query i sees keys
    /// `[i + sk - sq - left, i + sk - sq + right]`; `None` is unbounded.
    fn flash_attn_windowed(q, k, v, softmax_scale: f32,
        window_size_left: Option<usize>, window_size_right: Option<usize>) -> Tensor {
        Call::window(window_size_left, window_size_right).run((q, k, v), softmax_scale)
    }

    /// ALiBi: score bias `-slope * |i + sk - sq - j|`; slopes f32 `(heads_q)` or `(batch, heads_q)`.
    fn flash_attn_alibi(q, k, v, alibi_slopes: &Tensor, softmax_scale: f32, causal: bool)
        -> Tensor {
        Call::causal(causal).alibi(Some(alibi_slopes)).run((q, k, v), softmax_scale)
    }

    /// ALiBi with a sliding window.
    fn flash_attn_alibi_windowed(q, k, v, alibi_slopes: &Tensor, softmax_scale: f32,
        window_size_left: Option<usize>, window_size_right: Option<usize>) -> Tensor {
        Call::window(window_size_left, window_size_right)
            .alibi(Some(alibi_slopes))
            .run((q, k, v), softmax_scale)
    }

    /// Everything: optional ALiBi, window, and softcap `c * tanh(s / c)` (0 is off, not 1).
    fn flash_attn_alibi_windowed_softcap(q, k, v, alibi_slopes: Option<&Tensor>,
        softmax_scale: f32, window_size_left: Option<usize>, window_size_right: Option<usize>,
        softcap: f32) -> Tensor {
        Call::window(window_size_left, window_size_right)
            .alibi(alibi_slopes)
            .softcap(softcap)
            .run((q, k, v), softmax_scale)
    }

    /// As [`flash_attn_alibi_windowed_softcap`], also returning the LSE, f32
    /// `(batch, heads_q, seqlen_q)` (natural log; `-inf` for a row that sees no key).
    fn flash_attn_with_lse(q, k, v, alibi_slopes: Option<&Tensor>,
        softmax_scale: f32, window_size_left: Option<usize>, window_size_right: Option<usize>,
        softcap: f32) -> (Tensor, Tensor) {
        let (b, sq, hq, _) = q.dims4()?;
        Call::window(window_size_left, window_size_right)
            .alibi(alibi_slopes)
            .softcap(softcap)
            .run_with_lse((q, k, v), softmax_scale, &[b, hq, sq])
    }

    /// Variable-length batch, causal or not. `seqlens_*` hold `batch + 1` cumulative offsets
    /// (any integer dtype); `max_seqlen_*` must be at least the longest sequence.
    fn flash_attn_varlen(q, k, v, seqlens_q: &Tensor, seqlens_k: &Tensor,
        max_seqlen_q: usize, max_seqlen_k: usize, softmax_scale: f32, causal: bool) -> Tensor {
        Call::causal(causal)
            .varlen((seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))
            .run((q, k, v), softmax_scale)
    }

    /// Variable-length batch with a sliding window.
    fn flash_attn_varlen_windowed(q, k, v, seqlens_q: &Tensor, seqlens_k: &Tensor,
        max_seqlen_q: usize, max_seqlen_k: usize, softmax_scale: f32,
        window_size_left: Option<usize>, window_size_right: Option<usize>) -> Tensor {
        Call::window(window_size_left, window_size_right)
            .varlen((seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))
            .run((q, k, v), softmax_scale)
    }

    /// Variable-length batch with ALiBi.
    fn flash_attn_varlen_alibi(q, k, v, alibi_slopes: &Tensor, seqlens_q: &Tensor,
        seqlens_k: &Tensor, max_seqlen_q: usize, max_seqlen_k: usize, softmax_scale: f32,
        causal: bool) -> Tensor {
        Call::causal(causal)
            .alibi(Some(alibi_slopes))
            .varlen((seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))
            .run((q, k, v), softmax_scale)
    }

    /// Variable-length batch with ALiBi and a sliding window.
    fn flash_attn_varlen_alibi_windowed(q, k, v, alibi_slopes: &Tensor, seqlens_q: &Tensor,
        seqlens_k: &Tensor, max_seqlen_q: usize, max_seqlen_k: usize, softmax_scale: f32,
        window_size_left: Option<usize>, window_size_right: Option<usize>) -> Tensor {
        Call::window(window_size_left, window_size_right)
            .alibi(Some(alibi_slopes))
            .varlen((seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))
            .run((q, k, v), softmax_scale)
    }

    /// Variable-length batch with everything: optional ALiBi, window, softcap (0 is off).
    fn flash_attn_varlen_alibi_windowed_softcap(q, k, v, alibi_slopes: Option<&Tensor>,
        seqlens_q: &Tensor, seqlens_k: &Tensor, max_seqlen_q: usize, max_seqlen_k: usize,
        softmax_scale: f32, window_size_left: Option<usize>, window_size_right: Option<usize>,
        softcap: f32) -> Tensor {
        Call::window(window_size_left, window_size_right)
            .alibi(alibi_slopes)
            .softcap(softcap)
            .varlen((seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))
            .run((q, k, v), softmax_scale)
    }

    /// As [`flash_attn_varlen_alibi_windowed_softcap`], also returning the LSE, f32
    /// `(heads_q, total_q)` (FlashAttention's varlen layout).
    fn flash_attn_varlen_with_lse(q, k, v, alibi_slopes: Option<&Tensor>,
        seqlens_q: &Tensor, seqlens_k: &Tensor, max_seqlen_q: usize, max_seqlen_k: usize,
        softmax_scale: f32, window_size_left: Option<usize>, window_size_right: Option<usize>,
        softcap: f32) -> (Tensor, Tensor) {
        let (tq, hq, _) = q.dims3()?;
        Call::window(window_size_left, window_size_right)
            .alibi(alibi_slopes)
            .softcap(softcap)
            .varlen((seqlens_q, seqlens_k), (max_seqlen_q, max_seqlen_k))
            .run_with_lse((q, k, v), softmax_scale, &[hq, tq])
    }
}
