//! The usual rotary tables (RoPE), for decode steps that rotate q and the new keys.

use flashattn_core::Rotary;

/// Tables `[positions, dim / 2]` where position `p`, pair `i` turns by
/// `p * base^(-2i / dim)` with base 10000 (GPT-NeoX, LLaMA). `interleaved`: pairs
/// `(2i, 2i+1)` (GPT-J) instead of halves `(i, i + dim/2)`.
pub fn rotary_tables(dim: usize, positions: usize, interleaved: bool) -> Rotary {
    let half = (dim / 2).max(1);
    let angle = |k: usize| {
        let (p, i) = (k / half, k % half);
        p as f64 * 10000f64.powf(-2.0 * i as f64 / dim as f64)
    };
    let n = positions.saturating_mul(dim / 2);
    Rotary {
        cos: (0..n).map(|k| angle(k).cos() as f32).collect(),
        sin: (0..n).map(|k| angle(k).sin() as f32).collect(),
        dim,
        interleaved,
    }
}
