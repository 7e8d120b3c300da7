//! flashattn inside candle.
//!
//! candle-flash-attn's functions with the same names and signatures ([`flash_attn`],
//! [`flash_attn_windowed`], [`flash_attn_alibi`], [`flash_attn_alibi_windowed`],
//! [`flash_attn_alibi_windowed_softcap`], [`flash_attn_varlen`] and its variants) plus
//! [`flash_attn_with_lse`], running flashattn's CPU backend on candle's CPU device, with a
//! backward so candle's autograd gets gradients; and [`FlashMha`], a multi-head attention layer.
//!
//! Two traps when switching from other attention code:
//! - `softcap` 0 means off (candle's sdpa and mistral.rs use 1.0 for off).
//! - causal is bottom-right aligned (query i sees key j iff `j <= i + seqlen_k - seqlen_q`),
//!   as in FlashAttention; PyTorch's `is_causal` is top-left aligned. They differ only when
//!   `seqlen_q != seqlen_k`.

mod functions;
mod host;
mod mha;
mod op;

pub use functions::{
    flash_attn, flash_attn_alibi, flash_attn_alibi_windowed, flash_attn_alibi_windowed_softcap,
    flash_attn_varlen, flash_attn_varlen_alibi, flash_attn_varlen_alibi_windowed,
    flash_attn_varlen_alibi_windowed_softcap, flash_attn_varlen_windowed,
    flash_attn_varlen_with_lse, flash_attn_windowed, flash_attn_with_lse,
};
pub use mha::{rotary, FlashMha, FlashMhaConfig};
