//! Tile sizes of every kernel, chosen in one place, and the launch arithmetic the host shares
//! with the kernels: they receive these numbers as `-D` defines (variants.rs) and mirror the
//! shared-memory layouts and the tile order (kernels/tiles.cuh) computed here.

/// One Hopper kernel configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
/// the wgmma wrappers (build.rs) that are multiples of 16 (P V steps over keys 16 at a time).
pub const HOPPER_BLOCK_N_CHOICES: [usize; 9] = [64, 80, 96, 112, 128, 144, 160, 176, 192];

/// Checks overrides of the keys per block and ring depth for `head_dim` (`None`: the
/// default): a generated wgmma size, 2 to 4 stages, and a ring that fits in shared memory.
/// Register pressure is checked by the SASS test, not here.
pub fn check_tiles(
    head_dim: usize,
    block_n: Option<usize>,
    stages: Option<usize>,
) -> Result<HopperTiles, String> {
    let t = hopper_tiles(head_dim)
        .ok_or_else(|| format!("no Hopper kernel for head_dim {head_dim}"))?;
    t.with_overrides(&HOPPER_BLOCK_N_CHOICES, block_n, stages, head_dim, 2)
}

impl HopperTiles {
    /// Dynamic shared memory with 16-bit elements: see [`HopperTiles::smem_bytes_with`].
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        self.smem_bytes_with(head_dim, 2)
    }

    /// Dynamic shared memory with elements of `elem_bytes`: Q, the K and V rings, 1 KiB for
    /// aligning to the swizzle period, and the mbarriers.
    pub fn smem_bytes_with(&self, head_dim: usize, elem_bytes: usize) -> usize {
        let q = self.block_m * head_dim * elem_bytes;
        let kv = 2 * self.stages * self.block_n * head_dim * elem_bytes;
        let barriers = 8 * (2 + 4 * self.stages);
        q + kv + 1024 + barriers
    }

    /// Sets the keys per block (one of `choices`) and the ring depth (2 to 4); `None` keeps
    /// the value. Checks that the tiles fit in shared memory.
    pub(crate) fn with_overrides(
        mut self,
        choices: &[usize],
        block_n: Option<usize>,
        stages: Option<usize>,
        head_dim: usize,
        elem_bytes: usize,
    ) -> Result<HopperTiles, String> {
        if let Some(n) = block_n {
            if !choices.contains(&n) {
                return Err(format!("block_n {n} is not one of {choices:?}"));
            }
            self.block_n = n;
        }
        if let Some(s) = stages {
            if !(2..=4).contains(&s) {
                return Err(format!("stages {s} is not in 2..=4"));
            }
            self.stages = s;
        }
        let smem = self.smem_bytes_with(head_dim, elem_bytes);
        if smem > HOPPER_SMEM_LIMIT {
            return Err(format!(
                "block_n {} with {} stages needs {smem} bytes of shared memory",
                self.block_n, self.stages,
            ));
        }
        Ok(self)
    }
}

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

/// Tiles of the portable kernel (kernels/generic_fwd.cu): a warp owns `rows_per_warp` query
/// rows and a lane takes one key of each 32-key block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GenericTiles {
    pub rows_per_warp: usize,
    pub warps: usize,
    pub block_n: usize,
}

/// The portable kernel's one configuration.
pub const GENERIC_TILES: GenericTiles = GenericTiles {
    rows_per_warp: 4,
    warps: 4,
    block_n: 32,
};

impl GenericTiles {
    pub fn block_m(&self) -> usize {
        self.rows_per_warp * self.warps
    }
    pub fn threads(&self) -> u32 {
        (self.warps * 32) as u32
    }
    /// Shared memory: Q rows, a K block padded by one column (no bank conflicts), a V block,
    /// all f32.
    pub fn smem_bytes(&self, head_dim: usize, head_dim_v: usize) -> usize {
        4 * (self.block_m() * head_dim + self.block_n * (head_dim + 1) + self.block_n * head_dim_v)
    }
}

/// Head dims the mma.sync kernel is compiled for (FlashAttention-2's set): a problem runs in
/// the smallest one that holds both `head_dim` and `head_dim_v`, zero-padded in shared memory;
/// k-steps and output tiles past the real dims are skipped at run time.
pub const MMA_HEAD_DIMS: [usize; 8] = [32, 64, 96, 128, 160, 192, 224, 256];

/// The mma.sync kernel's bucket for a problem, or `None` past 256.
pub fn mma_head_dim(head_dim: usize, head_dim_v: usize) -> Option<usize> {
    let d = head_dim.max(head_dim_v);
    MMA_HEAD_DIMS.into_iter().find(|&b| b >= d)
}

/// One mma.sync kernel configuration (kernels/mma_fwd.cu): `warps` warps share a block of
/// `block_m` query rows (16 per m16n8k16 tile, `m_tiles` tiles per warp) and walk K/V in
/// blocks of `block_n` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MmaTiles {
    pub block_m: usize,
    pub block_n: usize,
    pub warps: usize,
}

/// `128x64w4`: `block_m x block_n`, `w` warps (`FLASHATTN_CUDA_MMA_TILES`, cuda_bench).
impl std::str::FromStr for MmaTiles {
    type Err = String;
    fn from_str(s: &str) -> Result<MmaTiles, String> {
        let bad = || format!("mma tiles {s:?}: expected block_m x block_n w warps, e.g. 128x64w4");
        let (m, rest) = s.split_once('x').ok_or_else(bad)?;
        let (n, w) = rest.split_once('w').ok_or_else(bad)?;
        let num = |x: &str| x.parse::<usize>().map_err(|_| bad());
        Ok(MmaTiles {
            block_m: num(m)?,
            block_n: num(n)?,
            warps: num(w)?,
        })
    }
}

impl MmaTiles {
    pub fn threads(&self) -> u32 {
        (self.warps * 32) as u32
    }
    /// 16-row mma tiles per warp.
    pub fn m_tiles(&self) -> usize {
        self.block_m / (16 * self.warps)
    }
    /// Shared memory: one Q block and one K and one V block of `head_dim` (the bucket) 16-bit
    /// columns each; K and V alternate as the two buffers of the cp.async pipeline.
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        (self.block_m + 2 * self.block_n) * head_dim * 2
    }
    /// Shapes the kernel's fragment and copy loops need (it static_asserts the same): whole
    /// 16-row tiles per warp, 16-key steps of P V, head dims in multiples of 32, and blocks of
    /// whole copy sweeps (8 threads per row of 128-byte multiples, else 4).
    pub fn check(&self, head_dim: usize) -> Result<(), String> {
        let rows = 16 * self.warps;
        if !(1..=32).contains(&self.warps) {
            return Err(format!("{} warps: a block has 1 to 32", self.warps));
        }
        if self.block_m == 0 || !self.block_m.is_multiple_of(rows) {
            return Err(format!(
                "block_m {} is not a multiple of 16 x {} warps",
                self.block_m, self.warps
            ));
        }
        if self.block_n == 0 || !self.block_n.is_multiple_of(16) {
            return Err(format!("block_n {} is not a multiple of 16", self.block_n));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(32) {
            return Err(format!("head_dim {head_dim} is not a multiple of 32"));
        }
        let threads_per_row = if (head_dim / 8).is_multiple_of(8) {
            8
        } else {
            4
        };
        let sweep = self.threads() as usize / threads_per_row;
        if !self.block_m.is_multiple_of(sweep) || !self.block_n.is_multiple_of(sweep) {
            return Err(format!(
                "blocks of {} x {} rows are not whole copy sweeps of {sweep} rows",
                self.block_m, self.block_n
            ));
        }
        Ok(())
    }
}

/// The mma.sync kernel's tiles for `head_dim` (the bucket) on a GPU whose blocks may use
/// `smem_optin` bytes of shared memory. Up to head_dim 128: 128 query rows on 4 warps, two
/// 16-row tiles per warp, so each K/V fragment read from shared memory feeds two mma
/// (FlashAttention-2's layout); keys per block as large as the registers allow without spills
/// (checked for every CI arch by tests/sass.rs: 128 at head_dim 32, 64 at 64 and 96, 32 at
/// 128, FA2's sm_86 choice; FA2's A100 choice 128 x 64 spills here). Above 128, O alone needs
/// head_dim / 2 registers per 16-row tile: 8 warps of one tile each, 64 keys. Where that does
/// not fit in shared memory (99 KiB on sm_86 / sm_89 at head_dim 224 and 256): 64 x 64 on 4
/// warps. None of these was measured on a GPU yet; `FLASHATTN_CUDA_MMA_TILES` overrides them.
pub fn mma_tiles(head_dim: usize, smem_optin: usize) -> Result<MmaTiles, String> {
    let t = |block_m, block_n, warps| MmaTiles {
        block_m,
        block_n,
        warps,
    };
    let preferred = match head_dim {
        32 => t(128, 128, 4),
        64 | 96 => t(128, 64, 4),
        128 => t(128, 32, 4),
        160 | 192 | 224 | 256 => t(128, 64, 8),
        _ => return Err(format!("no mma.sync kernel for head_dim {head_dim}")),
    };
    [preferred, t(64, 64, 4)]
        .into_iter()
        .find(|t| t.smem_bytes(head_dim) <= smem_optin)
        .ok_or_else(|| {
            format!(
                "head_dim {head_dim} needs {} bytes of shared memory, this GPU allows {smem_optin}",
                t(64, 64, 4).smem_bytes(head_dim)
            )
        })
}

/// Largest dynamic shared memory per block of the archs compiled ahead of time (the CUDA
/// programming guide's table); a running backend reads the device's own value instead.
pub fn smem_optin_of_arch(arch: &str) -> usize {
    match arch.trim_end_matches('a') {
        "sm_80" | "sm_87" => 166_912,
        "sm_90" | "sm_100" => HOPPER_SMEM_LIMIT,
        _ => 101_376, // sm_86, sm_89, sm_120: 99 KiB
    }
}

/// A kernel launch: grid, threads per block, dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: usize,
}

/// A grid of `n` blocks in x, or an error naming what is too large (x takes up to 2^31 - 1).
pub fn grid_x(n: usize, what: &str) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| format!("{what} = {n} exceeds CUDA's 2^31 - 1 blocks per grid"))
}

/// A grid side in y or z (up to 65535).
pub fn grid_yz(n: usize, what: &str) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|&x| x <= 65_535)
        .ok_or_else(|| format!("{what} = {n} exceeds CUDA's 65535 blocks in y and z"))
}

impl HopperTiles {
    /// The persistent launch: one CTA per SM (never more than tiles), 384 threads; elements of
    /// `elem_bytes` (2, or 1 for FP8).
    pub fn launch(
        &self,
        head_dim: usize,
        elem_bytes: usize,
        total_tiles: usize,
        sm_count: usize,
    ) -> Result<Launch, String> {
        Ok(Launch {
            grid: (
                grid_x(persistent_grid(total_tiles, sm_count), "CTAs")?,
                1,
                1,
            ),
            block: HOPPER_THREADS,
            smem: self.smem_bytes_with(head_dim, elem_bytes),
        })
    }
}

impl MmaTiles {
    /// One CTA per (batch, head, query block), in x (the kernel decodes it: tiles.cuh).
    pub fn launch(&self, head_dim: usize, total_tiles: usize) -> Result<Launch, String> {
        Ok(Launch {
            grid: (grid_x(total_tiles, "query tiles")?, 1, 1),
            block: self.threads(),
            smem: self.smem_bytes(head_dim),
        })
    }
}

impl GenericTiles {
    /// Grid (query blocks, heads_q, batch).
    pub fn launch(
        &self,
        num_m_blocks: usize,
        heads_q: usize,
        batch: usize,
        head_dim: usize,
        head_dim_v: usize,
    ) -> Result<Launch, String> {
        Ok(Launch {
            grid: (
                grid_x(num_m_blocks, "query blocks")?,
                grid_yz(heads_q, "heads_q")?,
                grid_yz(batch, "batch")?,
            ),
            block: self.threads(),
            smem: self.smem_bytes(head_dim, head_dim_v),
        })
    }
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

    #[test]
    fn mma_buckets_pad_to_the_next_multiple_of_32() {
        assert_eq!(mma_head_dim(1, 1), Some(32));
        assert_eq!(mma_head_dim(32, 8), Some(32));
        assert_eq!(mma_head_dim(40, 40), Some(64));
        assert_eq!(mma_head_dim(72, 64), Some(96));
        assert_eq!(mma_head_dim(64, 129), Some(160));
        assert_eq!(mma_head_dim(200, 128), Some(224));
        assert_eq!(mma_head_dim(256, 256), Some(256));
        assert_eq!(mma_head_dim(257, 1), None);
    }

    #[test]
    fn mma_tiles_fit_and_fall_back_on_small_shared_memory() {
        let (a100, rtx) = (smem_optin_of_arch("sm_80"), smem_optin_of_arch("sm_86"));
        assert_eq!((a100, rtx), (166_912, 101_376));
        assert_eq!(smem_optin_of_arch("sm_90a"), HOPPER_SMEM_LIMIT);
        for d in MMA_HEAD_DIMS {
            for smem in [a100, rtx, HOPPER_SMEM_LIMIT] {
                let t = mma_tiles(d, smem).unwrap();
                t.check(d).unwrap();
                assert!(t.smem_bytes(d) <= smem, "d{d}: {t:?}");
                // 16-row tiles: two per warp up to d128 (fragment reuse), one above.
                assert_eq!(
                    t.m_tiles(),
                    if d <= 128 && t.block_m == 128 { 2 } else { 1 }
                );
            }
        }
        let t = mma_tiles(128, a100).unwrap();
        assert_eq!(
            (t.block_m, t.block_n, t.warps, t.threads()),
            (128, 32, 4, 128)
        );
        // Q 128 rows + K and V 32 rows each, 128 columns of 2 bytes.
        assert_eq!(t.smem_bytes(128), (128 + 64) * 128 * 2);
        // 128 x 64 on 8 warps needs 128 KiB at d256: the A100 has it, an RTX 4090 does not.
        assert_eq!(mma_tiles(256, a100).unwrap().block_m, 128);
        let small = mma_tiles(256, rtx).unwrap();
        assert_eq!((small.block_m, small.block_n, small.warps), (64, 64, 4));
        assert_eq!(small.smem_bytes(256), 98_304);
        assert!(mma_tiles(256, 64 * 1024).is_err());
        assert!(mma_tiles(100, a100).is_err());
    }

    #[test]
    fn mma_tile_checks_refuse_shapes_the_kernel_cannot_take() {
        let t = |block_m, block_n, warps| MmaTiles {
            block_m,
            block_n,
            warps,
        };
        assert!(t(128, 64, 4).check(128).is_ok());
        assert!(t(128, 64, 8).check(96).is_ok());
        assert!(
            t(96, 64, 4).check(64).is_err(),
            "not whole 16-row tiles per warp"
        );
        assert!(t(128, 40, 4).check(64).is_err(), "not 16-key steps");
        assert!(t(128, 64, 0).check(64).is_err());
        assert!(
            t(128, 64, 4).check(72).is_err(),
            "head dims are buckets of 32"
        );
        assert!(t(16, 16, 1).check(96).is_ok());
        assert!(
            t(64, 16, 8).check(128).is_err(),
            "16 rows are not a 32-row copy sweep"
        );
    }

    #[test]
    fn launches_of_each_kernel() {
        // mma: one CTA per (batch, head, query block), in x.
        let t = mma_tiles(96, 166_912).unwrap();
        let l = t.launch(96, 3 * 8 * 2).unwrap();
        assert_eq!(l.grid, (48, 1, 1));
        assert_eq!((l.block, l.smem), (128, (128 + 128) * 96 * 2));
        assert!(t.launch(96, 1 << 31).is_err());
        // Hopper: persistent, one CTA per SM at most.
        let h = hopper_tiles(128).unwrap();
        let l = h.launch(128, 2, 1000, 132).unwrap();
        assert_eq!(
            (l.grid, l.block, l.smem),
            ((132, 1, 1), 384, h.smem_bytes(128))
        );
        assert_eq!(h.launch(128, 2, 7, 132).unwrap().grid, (7, 1, 1));
        // Portable: (query blocks, heads, batch), y and z below 65536.
        let l = GENERIC_TILES.launch(9, 16, 3, 64, 64).unwrap();
        assert_eq!((l.grid, l.block), ((9, 16, 3), 128));
        assert_eq!(l.smem, 4 * (16 * 64 + 32 * 65 + 32 * 64));
        let e = GENERIC_TILES.launch(9, 70_000, 1, 64, 64).unwrap_err();
        assert!(e.contains("heads_q = 70000"), "{e}");
        assert!(grid_x(usize::MAX, "x").is_err());
        assert_eq!(grid_yz(65_535, "y"), Ok(65_535));
    }

    #[test]
    fn generic_smem_matches_the_kernel_layout() {
        // sq [16][d] + sk [32][d+1] + sv [32][dv], f32; the largest fits a 96 KiB opt-in (V100).
        assert_eq!(GENERIC_TILES.block_m(), 16);
        assert!(GENERIC_TILES.smem_bytes(256, 256) <= 96 * 1024);
    }

    #[test]
    fn mma_tiles_parse() {
        let t: MmaTiles = "128x64w4".parse().unwrap();
        assert_eq!((t.block_m, t.block_n, t.warps), (128, 64, 4));
        for bad in ["", "128x64", "x64w4", "128x64w", "128y64w4", "-1x64w4"] {
            assert!(bad.parse::<MmaTiles>().is_err(), "{bad}");
        }
    }
}
