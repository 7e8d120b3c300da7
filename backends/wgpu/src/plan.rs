//! How a pass is cut into dispatches. Two independent cuts:
//! - binding chunks: tensors larger than the storage binding limit are bound in token ranges
//!   (q-side buffers by query tokens, k-side by key tokens);
//! - slices: one workgroup never walks more than a bounded number of keys (backward dK/dV:
//!   query rows) per dispatch. Longer ranges take several dispatches whose partial results
//!   accumulate in a fixed order (forward: split-KV partials merged by the combine kernel;
//!   backward: f32 gradient accumulators).

use crate::device::unsupported;
use flashattn_core::Result;

/// Keys (dK/dV: query rows) one workgroup walks in one dispatch, at most.
///
/// Why a bound: llvmpipe (lavapipe, Mesa 22.3 as in Debian 12) counts every loop iteration of an
/// invocation against one counter per shader, LP_MAX_TGSI_LOOP_ITERATIONS = 65535, and silently
/// leaves all loops once it runs out. Measured on it with the bound lifted (2026-12, f32, one
/// workgroup walking everything): the forward went wrong from 12.5k keys at head_dim 64 and
/// 7.8k at 256 (8.4 iterations per key), dQ from 4.1k keys and dK/dV from 2.7k rows at
/// head_dim 256 (16 and 24 per key or row). If the driver unrolled nothing, a key would cost
/// the forward DS/2 + DVS/2 + TPR + 5 <= 53 iterations (DS = DVS = 32 slots, TPR <= 16, per
/// shaders/flash_fwd.wgsl's loops), a key of dQ or a row of dK/dV at most ~100. So:
/// - forward, 512 keys: ~4.3k iterations as measured (7% of the cap), <= 27k unrolled nothing;
/// - backward, 256 keys or rows: ~6.1k as measured (9%), <= 26k unrolled nothing;
///
/// plus < 600 for a dispatch's prologue, epilogue and dK/dV's loop over the heads its slice meets.
pub const MAX_KEYS_PER_WORKGROUP: u32 = 512;
/// The backward kernels' bound (see above).
pub const MAX_BACKWARD_WALK: u32 = 256;

/// How one walked dimension (keys, or backward query rows) is sliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slicing {
    /// Slices walked side by side in one dispatch (split-KV), each into its own partial slot.
    pub splits: u32,
    /// Positions per slice (a multiple of the block), at most the bound.
    pub slice_len: u32,
    /// Dispatches in sequence: dispatch `p` walks slices `p * splits ..`.
    pub passes: u32,
}

/// Slices `[0, len)` into slices of at most `max_len` positions (a multiple of `block`), at most
/// `splits` of them side by side: as few passes as the bound allows, then as few slices.
pub fn slicing(len: u64, block: u32, splits: u32, max_len: u32) -> Slicing {
    let block = u64::from(block.max(1));
    let cap = (u64::from(max_len) / block * block).max(block);
    let splits = u64::from(splits.max(1));
    let slice_len = len
        .div_ceil(splits)
        .next_multiple_of(block)
        .clamp(block, cap);
    let slices = len.div_ceil(slice_len).max(1);
    let splits = splits.min(slices);
    Slicing {
        splits: splits as u32,
        slice_len: slice_len as u32,
        passes: slices.div_ceil(splits) as u32,
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Smallest token count whose byte offset is a multiple of `align` for every row size.
fn token_align(rows: &[u64], align: u64) -> u64 {
    rows.iter().fold(1, |acc, &r| {
        let need = align / gcd(r.max(1), align);
        acc / gcd(acc, need) * need
    })
}

/// Cuts `[0, total)` into ranges of at most `per` tokens.
fn ranges(total: u64, per: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut t = 0;
    while t < total {
        let e = (t + per).min(total);
        v.push((t, e));
        t = e;
    }
    v
}

/// Token ranges of `total` tokens such that every buffer bound at their offsets (bytes per
/// token in `rows`) and a buffer bound whole per range (`whole_row` bytes per token) fit under
/// `limit` bytes, with offsets aligned to `align`. `what` names the tokens in errors.
pub fn token_chunks(
    total: u64,
    rows: &[u64],
    whole_row: u64,
    limit: u64,
    align: u64,
    what: &str,
) -> Result<Vec<(u64, u64)>> {
    // Room for rounding the last range up to whole words.
    let lim = limit.saturating_sub(4);
    let row = rows.iter().copied().fold(whole_row, u64::max).max(1);
    let per = if total * row <= lim {
        total
    } else {
        // The whole-bound buffer starts at offset 0: only the others need aligned offsets.
        let a = token_align(rows, align);
        let per = lim / row / a * a;
        if per == 0 {
            return Err(unsupported(format!(
                "{a} {what} tokens ({} bytes) exceed the storage binding limit of {limit} bytes",
                a * row
            )));
        }
        per
    };
    Ok(ranges(total, per.max(1)))
}

/// Bytes per token of the forward's tensors and the token counts.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub q_row: u64,
    pub o_row: u64,
    pub k_row: u64,
    pub v_row: u64,
    pub q_tokens: u64,
    pub k_tokens: u64,
    /// Bytes per query token of the partial results of one split slot (O f32 + LSE).
    pub part_row: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub q_chunks: Vec<(u64, u64)>,
    pub k_chunks: Vec<(u64, u64)>,
    pub keys: Slicing,
    /// Partial results + combine (else the flash kernel writes out and LSE directly).
    pub partial: bool,
    /// Rows of the largest query chunk (sizes the partial buffer).
    pub max_rows: u64,
}

impl Plan {
    /// Bytes of the partial buffer (0 without).
    pub fn partial_bytes(&self, g: &Geometry) -> u64 {
        if self.partial {
            u64::from(self.keys.splits) * self.max_rows * g.part_row
        } else {
            0
        }
    }
}

/// The forward plan for `g` under a binding limit of `limit` bytes with offsets aligned to
/// `align`, keys sliced by `keys`. `force_partial`: write through the combine kernel even
/// when one dispatch covers the keys.
pub fn plan(
    g: &Geometry,
    limit: u64,
    align: u64,
    keys: Slicing,
    force_partial: bool,
) -> Result<Plan> {
    let k_chunks = token_chunks(g.k_tokens, &[g.k_row, g.v_row], 0, limit, align, "key")?;
    let partial = force_partial || keys.splits > 1 || keys.passes > 1 || k_chunks.len() > 1;
    let part_row = if partial {
        g.part_row * u64::from(keys.splits)
    } else {
        0
    };
    let q_chunks = token_chunks(
        g.q_tokens,
        &[g.q_row, g.o_row],
        part_row,
        limit,
        align,
        "query (incl. split-KV partials)",
    )?;
    let max_rows = q_chunks.iter().map(|c| c.1 - c.0).max().unwrap_or(0);
    Ok(Plan {
        q_chunks,
        k_chunks,
        keys,
        partial,
        max_rows,
    })
}

/// The backward's tensors bound in token ranges: bytes per token of every query-side buffer
/// (q, out, dout, statistics, dq and its accumulator) and key-side buffer (k, v, dk, dv and
/// their accumulators).
#[derive(Clone, Debug)]
pub struct BackwardGeometry {
    pub q_tokens: u64,
    pub k_tokens: u64,
    pub q_rows: Vec<u64>,
    pub k_rows: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackwardPlan {
    pub q_chunks: Vec<(u64, u64)>,
    pub k_chunks: Vec<(u64, u64)>,
    /// Keys a dQ workgroup walks per dispatch.
    pub dq_keys: Slicing,
    /// Virtual query rows (group heads x rows) a dK/dV workgroup walks per dispatch.
    pub dkdv_rows: Slicing,
}

pub fn backward_plan(
    g: &BackwardGeometry,
    limit: u64,
    align: u64,
    dq_keys: Slicing,
    dkdv_rows: Slicing,
) -> Result<BackwardPlan> {
    Ok(BackwardPlan {
        q_chunks: token_chunks(g.q_tokens, &g.q_rows, 0, limit, align, "query")?,
        k_chunks: token_chunks(g.k_tokens, &g.k_rows, 0, limit, align, "key")?,
        dq_keys,
        dkdv_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(tokens: u64, row: u64) -> Geometry {
        Geometry {
            q_row: row,
            o_row: row,
            k_row: row,
            v_row: row,
            q_tokens: tokens,
            k_tokens: tokens,
            part_row: row + 4,
        }
    }

    fn one_pass(splits: u32) -> Slicing {
        Slicing {
            splits,
            slice_len: 1 << 20,
            passes: 1,
        }
    }

    #[test]
    fn fits_in_one_dispatch_when_small() {
        let p = plan(&geom(100, 512), 1 << 20, 256, one_pass(1), false).unwrap();
        assert_eq!(p.q_chunks.len(), 1);
        assert!(!p.partial);
        assert_eq!(p.k_chunks, vec![(0, 100)]);
    }

    #[test]
    fn chunks_are_aligned_and_cover_everything() {
        // 40-byte rows (e.g. 5 heads x 4 dims x f16): offsets must be multiples of 256 bytes.
        let g = geom(1000, 40);
        let p = plan(&g, 16384, 256, one_pass(2), false).unwrap();
        assert!(p.partial);
        let ks = &p.k_chunks;
        assert!(ks.len() > 1);
        assert_eq!(ks.first().unwrap().0, 0);
        assert_eq!(ks.last().unwrap().1, 1000);
        for w in ks.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
        for (k0, k1) in ks {
            assert_eq!(k0 * 40 % 256, 0);
            assert!((k1 - k0) * 40 <= 16384);
        }
        // Key ranges accumulate into the split slots: partials do not grow with them.
        assert_eq!(p.partial_bytes(&g), 2 * p.max_rows * 44);
        for c in &p.q_chunks {
            assert_eq!(c.0 * 40 % 256, 0);
            assert!((c.1 - c.0) * 44 * u64::from(p.keys.splits) <= 16384);
            assert!(c.1 - c.0 < 1000, "q is chunked too");
        }
        assert_eq!(p.q_chunks.last().unwrap().1, 1000);
    }

    #[test]
    fn a_row_larger_than_the_limit_is_an_error() {
        assert!(plan(&geom(10, 8192), 4096, 256, one_pass(1), false).is_err());
    }

    /// Every position is in exactly one slice of one pass, and no slice exceeds the bound.
    #[test]
    fn slices_cover_the_range_within_the_bound() {
        for len in [0u64, 1, 31, 32, 33, 511, 512, 513, 4096, 16000, 100_000] {
            for splits in [1, 3, 32] {
                for block in [1, 16, 32] {
                    let s = slicing(len, block, splits, MAX_KEYS_PER_WORKGROUP);
                    assert!(s.slice_len <= MAX_KEYS_PER_WORKGROUP, "{len} {s:?}");
                    assert_eq!(s.slice_len % block, 0);
                    assert!(s.splits >= 1 && s.splits <= splits && s.passes >= 1);
                    let covered = u64::from(s.splits * s.passes) * u64::from(s.slice_len);
                    assert!(covered >= len, "{len} {splits} {block}: {s:?}");
                    // No pass is wasted: the last one starts inside the range.
                    let before_last = u64::from(s.splits * (s.passes - 1) * s.slice_len);
                    assert!(before_last < len.max(1), "{len} {splits} {block}: {s:?}");
                }
            }
        }
        assert_eq!(slicing(100_000, 32, 1, 512).passes, 196);
        assert_eq!(slicing(4096, 32, 32, 512).splits, 32);
    }
}
