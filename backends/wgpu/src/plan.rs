//! How a forward pass is cut into dispatches: tensors larger than the storage binding limit are
//! bound in token sub-ranges (q/out by query tokens, k/v by key tokens); several key ranges
//! or split-KV make partial (O, LSE) results that the combine kernel merges.

use crate::context::unsupported;
use flashattn_core::Result;

/// Bytes per token of each tensor and the token counts.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub q_row: u64,
    pub o_row: u64,
    pub k_row: u64,
    pub v_row: u64,
    pub q_tokens: u64,
    pub k_tokens: u64,
    /// Bytes per query token of the partial results of one split (O f32 + LSE).
    pub part_row: u64,
}

/// One range of query tokens and the key ranges its dispatches bind.
#[derive(Clone, Debug, PartialEq)]
pub struct QChunk {
    pub q0: u64,
    pub q1: u64,
    pub k_chunks: Vec<(u64, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub chunks: Vec<QChunk>,
    /// Split-KV splits inside each key range.
    pub splits: u32,
    /// Partial results + combine (else the flash kernel writes out and LSE directly).
    pub partial: bool,
    /// Splits per query chunk in the partial buffer: key ranges x splits.
    pub total_splits: u32,
    /// Rows of the largest query chunk (sizes the partial buffer).
    pub max_rows: u64,
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

/// The plan for `g` under a binding limit of `limit` bytes with offsets aligned to `align`.
pub fn plan(
    g: &Geometry,
    limit: u64,
    align: u64,
    splits: u32,
    force_partial: bool,
) -> Result<Plan> {
    // Room for rounding the last range up to whole words.
    let lim = limit.saturating_sub(4);
    let kv_row = g.k_row.max(g.v_row);
    let k_per = if g.k_tokens * kv_row <= lim {
        g.k_tokens
    } else {
        let a = token_align(&[g.k_row, g.v_row], align);
        let per = lim / kv_row / a * a;
        if per == 0 {
            return Err(unsupported(format!(
                "{a} key tokens ({} bytes) exceed the storage binding limit of {limit} bytes",
                a * kv_row
            )));
        }
        per
    };
    let k_chunks = ranges(g.k_tokens, k_per.max(1));
    // Key ranges already give the split parallelism, and every split costs partial memory.
    let splits = if k_chunks.len() > 1 { 1 } else { splits };
    let partial = force_partial || splits > 1 || k_chunks.len() > 1;
    let total_splits = if partial {
        u32::try_from(k_chunks.len())
            .ok()
            .and_then(|n| n.checked_mul(splits))
            .ok_or_else(|| unsupported("too many key chunks"))?
    } else {
        1
    };
    let part_row = if partial {
        g.part_row * u64::from(total_splits)
    } else {
        0
    };
    let q_row = g.q_row.max(g.o_row).max(part_row);
    let q_per = if g.q_tokens * q_row <= lim {
        g.q_tokens
    } else {
        // The partial buffer is bound whole per chunk: only q and out need aligned offsets.
        let a = token_align(&[g.q_row, g.o_row], align);
        let per = lim / q_row / a * a;
        if per == 0 {
            return Err(unsupported(format!(
                "{a} query tokens ({} bytes incl. split-KV partials) exceed the storage binding limit of {limit} bytes",
                a * q_row
            )));
        }
        per
    };
    let chunks: Vec<QChunk> = ranges(g.q_tokens, q_per.max(1))
        .into_iter()
        .map(|(q0, q1)| QChunk {
            q0,
            q1,
            k_chunks: k_chunks.clone(),
        })
        .collect();
    let max_rows = chunks.iter().map(|c| c.q1 - c.q0).max().unwrap_or(0);
    Ok(Plan {
        chunks,
        splits,
        partial,
        total_splits,
        max_rows,
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

    #[test]
    fn fits_in_one_dispatch_when_small() {
        let p = plan(&geom(100, 512), 1 << 20, 256, 1, false).unwrap();
        assert_eq!(p.chunks.len(), 1);
        assert!(!p.partial);
        assert_eq!(p.chunks[0].k_chunks, vec![(0, 100)]);
    }

    #[test]
    fn chunks_are_aligned_and_cover_everything() {
        // 40-byte rows (e.g. 5 heads x 4 dims x f16): offsets must be multiples of 256 bytes.
        let g = geom(1000, 40);
        let p = plan(&g, 16384, 256, 2, false).unwrap();
        assert!(p.partial);
        assert_eq!(p.splits, 1, "key ranges replace split-KV");
        let ks = &p.chunks[0].k_chunks;
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
        assert_eq!(p.total_splits, ks.len() as u32);
        for c in &p.chunks {
            assert_eq!(c.q0 * 40 % 256, 0);
            assert!((c.q1 - c.q0) * 44 * u64::from(p.total_splits) <= 16384);
            assert!(c.q1 - c.q0 < 1000, "q is chunked too");
        }
        assert_eq!(p.chunks.last().unwrap().q1, 1000);
    }

    #[test]
    fn a_row_larger_than_the_limit_is_an_error() {
        assert!(plan(&geom(10, 8192), 4096, 256, 1, false).is_err());
    }
}
