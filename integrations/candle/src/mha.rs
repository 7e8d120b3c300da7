//! `FlashMha`: FlashAttention's multi-head attention module (q/k/v projections, optional
//! rotary embedding, GQA, causal, output projection) for candle, loadable from a `VarBuilder`
//! with llama's weight names (`q_proj`, `k_proj`, `v_proj`, `o_proj`).

use crate::functions::flash_attn;
use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::{linear_b, Linear, VarBuilder};

/// The shape and options of a [`FlashMha`] layer.
#[derive(Clone, Debug, PartialEq)]
pub struct FlashMhaConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Key/value heads (GQA / MQA); must divide `num_heads`.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Bottom-right aligned causal mask.
    pub causal: bool,
    /// Rotary embedding base (rotate-half, as llama), or `None` for no rotary embedding.
    pub rotary_base: Option<f32>,
    /// Biases on the four projections.
    pub bias: bool,
}

/// Multi-head attention on flashattn. Input and output `(batch, seqlen, hidden_size)`.
#[derive(Clone, Debug)]
pub struct FlashMha {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    config: FlashMhaConfig,
}

impl FlashMha {
    /// Loads (or, with a `VarMap`-backed builder, creates) the four projections under `vb`.
    pub fn new(config: FlashMhaConfig, vb: VarBuilder) -> Result<Self> {
        let c = &config;
        if c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
            bail!(
                "flashattn: num_kv_heads = {} must divide num_heads = {}",
                c.num_kv_heads,
                c.num_heads
            );
        }
        if c.rotary_base.is_some() && !c.head_dim.is_multiple_of(2) {
            bail!(
                "flashattn: head_dim = {} must be even for rotary",
                c.head_dim
            );
        }
        let (h, q_out, kv_out) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        Ok(FlashMha {
            q_proj: linear_b(h, q_out, c.bias, vb.pp("q_proj"))?,
            k_proj: linear_b(h, kv_out, c.bias, vb.pp("k_proj"))?,
            v_proj: linear_b(h, kv_out, c.bias, vb.pp("v_proj"))?,
            o_proj: linear_b(q_out, h, c.bias, vb.pp("o_proj"))?,
            config,
        })
    }

    pub fn config(&self) -> &FlashMhaConfig {
        &self.config
    }

    /// Attention over `xs` whose first token sits at position `seqlen_offset` (rotary only).
    pub fn forward_at(&self, xs: &Tensor, seqlen_offset: usize) -> Result<Tensor> {
        let c = &self.config;
        let (b, s, _) = xs.dims3()?;
        let q = self
            .q_proj
            .forward(xs)?
            .reshape((b, s, c.num_heads, c.head_dim))?;
        let k = self
            .k_proj
            .forward(xs)?
            .reshape((b, s, c.num_kv_heads, c.head_dim))?;
        let v = self
            .v_proj
            .forward(xs)?
            .reshape((b, s, c.num_kv_heads, c.head_dim))?;
        let (q, k) = match c.rotary_base {
            Some(base) => (
                rotary(&q, seqlen_offset, base)?,
                rotary(&k, seqlen_offset, base)?,
            ),
            None => (q, k),
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let out = flash_attn(&q, &k, &v, scale, c.causal)?;
        self.o_proj
            .forward(&out.reshape((b, s, c.num_heads * c.head_dim))?)
    }
}

impl Module for FlashMha {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_at(xs, 0)
    }
}

/// Rotate-half rotary embedding of `x` `(batch, seqlen, heads, head_dim)` at positions
/// `offset..offset + seqlen`, written with differentiable candle ops.
pub fn rotary(x: &Tensor, offset: usize, base: f32) -> Result<Tensor> {
    let (_, s, _, d) = x.dims4()?;
    let half = d / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| base.powf(-((2 * i) as f32) / d as f32))
        .collect();
    let dev = x.device();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), dev)?;
    let pos = Tensor::arange(offset as u32, (offset + s) as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((s, 1))?;
    let angles = pos.broadcast_mul(&inv_freq)?;
    let angles = Tensor::cat(&[&angles, &angles], D::Minus1)?.reshape((1, s, 1, d))?;
    let (cos, sin) = (
        angles.cos()?.to_dtype(x.dtype())?,
        angles.sin()?.to_dtype(x.dtype())?,
    );
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}
