//! Tile sizes of the Hopper kernel, chosen in one place, and the tile arithmetic the host
//! shares with the kernel (which mirrors it in kernels/hopper_fwd.cu).

/// One Hopper kernel configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopperTiles {
    /// Query rows per tile: two consumer warpgroups of 64 rows (wgmma's M is 64).
    pub block_m: usize,
    /// Keys per block.
    pub block_n: usize,
    /// Depth of the K/V shared-memory ring.
    pub stages: usize,
}

/// Shared memory one block of the Hopper kernel may use on sm_90 (227 KiB).
pub const HOPPER_SMEM_LIMIT: usize = 232_448;

/// Head dimensions the Hopper kernel is built for (TMA boxes of 64 columns, 128-byte swizzle).
pub const HOPPER_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Threads of the Hopper kernel: one producer and two consumer warpgroups.
pub const HOPPER_THREADS: u32 = 384;

/// The tiles for `head_dim`:
/// - 64: 128 x 128. Small rows: a 128-key block keeps the S accumulator at 64 registers and
///   the smem ring small enough for 2 stages with room to spare.
/// - 128: 128 x 176 (FA3's non-causal choice). O (64 regs) + S (88) + P (44) fit the
///   240-register consumer budget without spills; Q 32 KiB + 2 stages x (K+V) 88 KiB =
///   208 KiB. Measured 2-4% faster than 128 x 128 at seqlen 8k on an H100 (PERF_NOTES.md).
/// - 256: 128 x 80 (FA3's choice). O takes 128 registers, so S must stay small (40);
///   Q 64 KiB + 2 stages x (K+V) 80 KiB = 224 KiB, just under the 227 KiB limit.
pub fn hopper_tiles(head_dim: usize) -> Option<HopperTiles> {
    match head_dim {
        64 => Some(HopperTiles {
            block_m: 128,
            block_n: 128,
            stages: 2,
        }),
        128 => Some(HopperTiles {
            block_m: 128,
            block_n: 176,
            stages: 2,
        }),
        256 => Some(HopperTiles {
            block_m: 128,
            block_n: 80,
            stages: 2,
        }),
        _ => None,
    }
}

/// Keys-per-block values the kernel can be built with: wgmma N sizes generated in
/// kernels/wgmma.cuh that are multiples of 16 (P V steps over keys 16 at a time).
pub const HOPPER_BLOCK_N_CHOICES: [usize; 9] = [64, 80, 96, 112, 128, 144, 160, 176, 192];

/// Checks overrides of the keys per block and ring depth for `head_dim` (`None`: the
/// default): a generated wgmma size, 2 to 4 stages, and a ring that fits in shared memory.
/// Register pressure is checked by the SASS test, not here.
pub fn check_tiles(
    head_dim: usize,
    block_n: Option<usize>,
    stages: Option<usize>,
) -> Result<HopperTiles, String> {
    let mut t = hopper_tiles(head_dim)
        .ok_or_else(|| format!("no Hopper kernel for head_dim {head_dim}"))?;
    if let Some(n) = block_n {
        if !HOPPER_BLOCK_N_CHOICES.contains(&n) {
            return Err(format!(
                "block_n {n} is not one of {HOPPER_BLOCK_N_CHOICES:?}"
            ));
        }
        t.block_n = n;
    }
    if let Some(s) = stages {
        if !(2..=4).contains(&s) {
            return Err(format!("stages {s} is not in 2..=4"));
        }
        t.stages = s;
    }
    if t.smem_bytes(head_dim) > HOPPER_SMEM_LIMIT {
        return Err(format!(
            "block_n {} with {} stages needs {} bytes of shared memory",
            t.block_n,
            t.stages,
            t.smem_bytes(head_dim)
        ));
    }
    Ok(t)
}

impl HopperTiles {
    /// Dynamic shared memory: Q, the K and V rings, 1 KiB for aligning to the swizzle
    /// period, and the mbarriers.
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        let q = self.block_m * head_dim * 2;
        let kv = 2 * self.stages * self.block_n * head_dim * 2;
        let barriers = 8 * (2 + 4 * self.stages);
        q + kv + 1024 + barriers
    }
}

#[cfg_attr(not(test), allow(dead_code))]
/// Query blocks of `block_m` rows covering `rows` rows.
pub fn num_blocks(rows: usize, block: usize) -> usize {
    rows.div_ceil(block)
}

#[cfg_attr(not(test), allow(dead_code))]
/// Tiles the persistent kernel walks: every (query block, head, batch).
pub fn total_tiles(num_m_blocks: usize, heads_q: usize, batch: usize) -> usize {
    num_m_blocks * heads_q * batch
}

/// Persistent grid: one block per SM, never more blocks than tiles.
pub fn persistent_grid(total_tiles: usize, sm_count: usize) -> usize {
    total_tiles.min(sm_count.max(1))
}

/// The Hopper kernel's tile order for a problem: head-major (the query blocks of one head in a
/// row) keeps a wave's K/V in L2 and was faster on an H100 for non-causal d128/d256 (8k:
/// 600 vs 560 and 693 vs 651 TFLOP/s); block-major (every head's last block first) balances
/// causal work and was faster for causal (8k d256: 552 vs 451) and for d64 (335 vs 307).
/// Measurements: PERF_NOTES.md, 2026-11-22 run 7.
pub fn head_major_order(causal: bool, head_dim: usize) -> bool {
    !causal && head_dim >= 128
}

#[cfg_attr(not(test), allow(dead_code))]
/// The (batch, head, query block) of tile `t`, as the kernel decodes it.
pub fn decode_tile(
    t: usize,
    num_m_blocks: usize,
    heads_q: usize,
    batch: usize,
    head_major: bool,
) -> (usize, usize, usize) {
    let (bh, m_block) = if head_major {
        (t / num_m_blocks, num_m_blocks - 1 - t % num_m_blocks)
    } else {
        let per_m = heads_q * batch;
        (t % per_m, num_m_blocks - 1 - t / per_m)
    };
    (bh / heads_q, bh % heads_q, m_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_shared_memory_and_wgmma_shapes() {
        for d in HOPPER_HEAD_DIMS {
            let t = hopper_tiles(d).unwrap();
            assert!(
                t.smem_bytes(d) <= HOPPER_SMEM_LIMIT,
                "d={d}: {} bytes",
                t.smem_bytes(d)
            );
            assert_eq!(t.block_m, 128);
            // wgmma N is a multiple of 8 (S = Q K^T); P V steps over keys 16 at a time.
            assert_eq!(t.block_n % 16, 0);
            assert!(t.block_n <= 256);
            // TMA boxes are at most 256 rows.
            assert!(t.block_m <= 256);
        }
        assert_eq!(hopper_tiles(96), None);
        assert_eq!(
            hopper_tiles(256).unwrap().smem_bytes(256),
            65536 + 163840 + 1024 + 80
        );
    }

    #[test]
    fn decode_visits_every_tile_once_longest_first() {
        let (m, h, b) = (3, 2, 2);
        let n = total_tiles(m, h, b);
        for head_major in [false, true] {
            let mut seen = std::collections::HashSet::new();
            for t in 0..n {
                let (bb, hh, mb) = decode_tile(t, m, h, b, head_major);
                assert!(bb < b && hh < h && mb < m);
                assert!(seen.insert((bb, hh, mb)));
            }
            assert_eq!(seen.len(), n);
            assert_eq!(decode_tile(0, m, h, b, head_major), (0, 0, m - 1));
        }
        // Head-major: one (batch, head) at a time, its query blocks last to first.
        assert_eq!(decode_tile(1, m, h, b, true), (0, 0, m - 2));
        assert_eq!(decode_tile(m, m, h, b, true), (0, 1, m - 1));
        assert_eq!(decode_tile(2 * m, m, h, b, true), (1, 0, m - 1));
        // Block-major: every (batch, head)'s last block, then the next-to-last ones.
        assert_eq!(decode_tile(1, m, h, b, false), (0, 1, m - 1));
        assert_eq!(decode_tile(h * b, m, h, b, false), (0, 0, m - 2));
        assert!(
            head_major_order(false, 128)
                && !head_major_order(true, 128)
                && !head_major_order(false, 64)
        );
    }

    #[test]
    fn block_n_overrides_are_checked() {
        assert_eq!(check_tiles(128, Some(176), None).unwrap().block_n, 176);
        assert_eq!(check_tiles(64, None, Some(3)).unwrap().stages, 3);
        assert!(
            check_tiles(128, None, Some(3)).is_err(),
            "176-key blocks leave room for 2 stages only"
        );
        assert!(
            check_tiles(128, Some(176), Some(3)).is_err(),
            "does not fit shared memory"
        );
        assert!(
            check_tiles(256, Some(192), None).is_err(),
            "does not fit shared memory"
        );
        assert!(
            check_tiles(128, Some(100), None).is_err(),
            "not a generated wgmma size"
        );
        assert!(check_tiles(128, None, Some(5)).is_err());
        assert!(check_tiles(96, Some(128), None).is_err());
    }

    #[test]
    fn grid_is_capped() {
        assert_eq!(persistent_grid(10, 132), 10);
        assert_eq!(persistent_grid(1000, 132), 132);
        assert_eq!(num_blocks(129, 128), 2);
        assert_eq!(num_blocks(128, 128), 1);
    }
}
