//! Tile sizes and launch arithmetic of the backward kernels (kernels/mma_bwd.cu,
//! kernels/generic_bwd.cu, kernels/bwd_prep.cu); they receive these numbers as `-D` defines
//! (variants.rs) and mirror the shared-memory layouts computed here.

use crate::tiles::{grid_x, grid_yz, num_blocks, Launch};

/// Head dims the mma.sync backward is compiled for: a problem runs in the smallest that holds
/// `head_dim` and `head_dim_v`, zero-padded in shared memory; contraction steps and output
/// columns past the real dims are skipped at run time, so padding costs shared memory and
/// registers, not FLOPs. Three buckets keep CI's compile time small (tests/sass.rs compiles
/// every variant for four archs).
pub const MMA_BWD_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The mma.sync backward's bucket for a problem, or `None` past 256.
pub fn mma_bwd_head_dim(head_dim: usize, head_dim_v: usize) -> Option<usize> {
    let d = head_dim.max(head_dim_v);
    MMA_BWD_HEAD_DIMS.into_iter().find(|&b| b >= d)
}

/// One configuration of the mma.sync backward. The main kernel: a CTA of `warps` warps owns
/// `block_n` keys (16 per warp, or per warp pair above head_dim 128: `split`), walks the query
/// blocks of `block_m` rows with `stages` Q/dO buffers. The deterministic dq kernel: 16 query
/// rows per warp, key blocks of `dq_block_n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MmaBwdTiles {
    pub block_m: usize,
    pub block_n: usize,
    pub warps: usize,
    pub stages: usize,
    pub dq_block_n: usize,
}

/// Threads of `fa_bwd_prep` (one warp per row) and `fa_bwd_post`.
pub const PREP_THREADS: u32 = 128;
pub const POST_THREADS: u32 = 256;
/// `fa_bwd_post` strides over dq with at most this many CTAs.
const POST_MAX_CTAS: usize = 1 << 20;

impl MmaBwdTiles {
    pub const fn new(
        block_m: usize,
        block_n: usize,
        warps: usize,
        stages: usize,
        dq_block_n: usize,
    ) -> Self {
        MmaBwdTiles {
            block_m,
            block_n,
            warps,
            stages,
            dq_block_n,
        }
    }

    pub fn threads(&self) -> u32 {
        (self.warps * 32) as u32
    }
    /// Warps sharing one 16-key tile (each owning half of dK's and dV's columns).
    pub fn split(&self) -> usize {
        self.warps * 16 / self.block_n
    }
    /// Query rows per CTA of the dq kernel.
    pub fn dq_block_m(&self) -> usize {
        16 * self.warps
    }
    /// The main kernel's shared memory: K and V, `stages` x (Q, dO) of `head_dim` (the bucket)
    /// 16-bit columns, the dS^T tile (and P^T with `split` 2) of block_n x block_m 16-bit
    /// values, and the rows' LSE and delta (f32) per stage.
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        let (m, n) = (self.block_m, self.block_n);
        (2 * n + 2 * self.stages * m) * head_dim * 2
            + self.split() * n * m * 2
            + 8 * self.stages * m
    }
    /// The dq kernel's: Q, dO, K and V blocks.
    pub fn dq_smem_bytes(&self, head_dim: usize) -> usize {
        (2 * self.dq_block_m() + 2 * self.dq_block_n) * head_dim * 2
    }

    /// The shapes mma_bwd.cu's fragment loops take (it `#error`s on the same): 16 keys per warp
    /// or warp pair, 16-query steps per warp, 16-column groups for dK/dV and dQ, 1 or 2
    /// stages, and blocks of whole copy sweeps (8 threads per row of 128-byte multiples).
    pub fn check(&self, head_dim: usize) -> Result<(), String> {
        let bad = |why: String| {
            Err(format!(
                "mma backward tiles {self:?} at head_dim {head_dim}: {why}"
            ))
        };
        if !(1..=16).contains(&self.warps) || self.block_n == 0 || self.block_m == 0 {
            return bad("1 to 16 warps, non-empty blocks".into());
        }
        let split = self.warps * 16 / self.block_n;
        if split * self.block_n != self.warps * 16 || !(1..=2).contains(&split) {
            return bad("block_n must be 16 keys per warp or per warp pair".into());
        }
        let q_cols = self.block_m / split;
        if !self.block_m.is_multiple_of(16 * split) || !q_cols.is_multiple_of(16) {
            return bad("each warp's queries must be whole 16-row steps".into());
        }
        if !head_dim.is_multiple_of(64) || !(head_dim / split).is_multiple_of(16) {
            return bad("head dims are buckets of 64".into());
        }
        let row_tiles = self.block_m / 16;
        let dq_wm = self.warps.min(row_tiles);
        if !row_tiles.is_multiple_of(dq_wm)
            || !self.warps.is_multiple_of(dq_wm)
            || !(head_dim / (self.warps / dq_wm)).is_multiple_of(16)
        {
            return bad("dQ's warps must split into 16-row tiles x 16-column groups".into());
        }
        if !(1..=2).contains(&self.stages) {
            return bad("1 or 2 stages".into());
        }
        if self.dq_block_n == 0 || !self.dq_block_n.is_multiple_of(16) {
            return bad("the dq kernel walks keys 16 at a time".into());
        }
        let sweep = self.threads() as usize / 8;
        let blocks = [
            self.block_m,
            self.block_n,
            self.dq_block_m(),
            self.dq_block_n,
        ];
        if blocks.iter().any(|b| !b.is_multiple_of(sweep)) {
            return bad(format!("blocks must be whole copy sweeps of {sweep} rows"));
        }
        Ok(())
    }
}

/// The mma.sync backward's tiles for `head_dim` (a bucket) on a GPU whose blocks may use
/// `smem_optin` bytes of shared memory, the first of the preferred configurations that fits:
/// - 64: 64 queries x 128 keys on 8 warps (FlashAttention-2's A100 block_n), double-buffered
///   Q/dO: 81 KiB, every arch; dK and dV take 64 registers a thread.
/// - 128: the same tiles on the A100 / H100 (145 KiB; dK and dV 128 registers); 99 KiB GPUs
///   (sm_86, sm_89): 64 x 64 on 4 warps, one Q/dO buffer (73 KiB).
/// - 256: two warps per 16-key tile, each owning half of dK's and dV's columns (dK and dV
///   alone would take 256 registers on one warp): 64 x 64 on 8 warps, one buffer (145 KiB);
///   99 KiB GPUs: 32 x 32 on 4 warps (69 KiB).
///
/// Registers without spills on every CI arch: tests/sass.rs. None of these was timed on a GPU.
pub fn mma_bwd_tiles(head_dim: usize, smem_optin: usize) -> Result<MmaBwdTiles, String> {
    let t = MmaBwdTiles::new;
    let choices = match head_dim {
        64 => vec![t(64, 128, 8, 2, 64), t(64, 64, 4, 2, 64)],
        128 => vec![t(64, 128, 8, 2, 64), t(64, 64, 4, 1, 64)],
        256 => vec![t(64, 64, 8, 1, 32), t(32, 32, 4, 1, 32)],
        _ => return Err(format!("no mma.sync backward for head_dim {head_dim}")),
    };
    let fits =
        |t: &MmaBwdTiles| t.smem_bytes(head_dim).max(t.dq_smem_bytes(head_dim)) <= smem_optin;
    let last = choices[choices.len() - 1];
    choices.into_iter().find(fits).ok_or_else(|| {
        format!(
            "the mma.sync backward at head_dim {head_dim} needs {} bytes of shared memory, this GPU allows {smem_optin}",
            last.smem_bytes(head_dim).max(last.dq_smem_bytes(head_dim))
        )
    })
}

/// Tiles of the portable backward (kernels/generic_bwd.cu): a warp owns `keys_per_warp` keys
/// (lanes own head-dim columns), `warps` warps per CTA; the dq kernel takes a row per warp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GenericBwdTiles {
    pub warps: usize,
    pub keys_per_warp: usize,
}

/// The portable backward's one configuration: 2 keys per warp keep k, v, dK, dV of 256
/// columns at 64 registers a lane.
pub const GENERIC_BWD_TILES: GenericBwdTiles = GenericBwdTiles {
    warps: 4,
    keys_per_warp: 2,
};

/// The sizes a backward launch plan needs.
#[derive(Clone, Copy, Debug)]
pub struct BwdShape {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub q_tokens: usize,
    pub head_dim: usize,
    pub max_q_len: usize,
    pub max_k_len: usize,
}

/// `None` for a grid with no blocks (nothing to launch), else the launch.
fn launch(grid: (u32, u32, u32), block: u32, smem: usize) -> Option<Launch> {
    (grid.0 > 0 && grid.1 > 0 && grid.2 > 0).then_some(Launch { grid, block, smem })
}

/// `fa_bwd_prep`: a warp per (token, head) row.
pub fn prep_launch(s: &BwdShape) -> Result<Option<Launch>, String> {
    let rows = s.q_tokens.saturating_mul(s.heads_q);
    let ctas = grid_x(rows.div_ceil(PREP_THREADS as usize / 32), "prep rows")?;
    Ok(launch((ctas, 1, 1), PREP_THREADS, 0))
}

/// `fa_bwd_post`: CTAs striding over dq's elements.
pub fn post_launch(s: &BwdShape) -> Result<Option<Launch>, String> {
    let elems = s
        .q_tokens
        .saturating_mul(s.heads_q)
        .saturating_mul(s.head_dim);
    let ctas = elems.div_ceil(POST_THREADS as usize).min(POST_MAX_CTAS);
    Ok(launch((grid_x(ctas, "post")?, 1, 1), POST_THREADS, 0))
}

/// The backward's per-head grids: the main kernel's over key blocks and KV heads, the
/// deterministic dq kernel's over query blocks and query heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerHead {
    Keys,
    Queries,
}

/// `which` kernel's grid: (blocks of `block` keys or queries, heads, batch), each side named
/// for its error.
pub fn per_head_launch(
    s: &BwdShape,
    which: PerHead,
    block: usize,
    threads: u32,
    smem: usize,
) -> Result<Option<Launch>, String> {
    let (len, blocks_name, heads, heads_name) = match which {
        PerHead::Keys => (s.max_k_len, "key blocks", s.heads_kv, "heads_kv"),
        PerHead::Queries => (s.max_q_len, "query blocks", s.heads_q, "heads_q"),
    };
    let grid = (
        grid_x(num_blocks(len, block), blocks_name)?,
        grid_yz(heads, heads_name)?,
        grid_yz(s.batch, "batch")?,
    );
    Ok(launch(grid, threads, smem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiles::{smem_optin_of_arch, HOPPER_SMEM_LIMIT};

    #[test]
    fn buckets() {
        assert_eq!(mma_bwd_head_dim(1, 1), Some(64));
        assert_eq!(mma_bwd_head_dim(40, 72), Some(128));
        assert_eq!(mma_bwd_head_dim(192, 128), Some(256));
        assert_eq!(mma_bwd_head_dim(256, 256), Some(256));
        assert_eq!(mma_bwd_head_dim(257, 8), None);
    }

    #[test]
    fn tiles_fit_every_ci_arch_and_pass_the_kernel_checks() {
        let (a100, rtx) = (smem_optin_of_arch("sm_80"), smem_optin_of_arch("sm_86"));
        for d in MMA_BWD_HEAD_DIMS {
            for smem in [a100, rtx, HOPPER_SMEM_LIMIT] {
                let t = mma_bwd_tiles(d, smem).unwrap();
                t.check(d).unwrap();
                assert!(
                    t.smem_bytes(d) <= smem && t.dq_smem_bytes(d) <= smem,
                    "d{d}: {t:?}"
                );
                assert_eq!(t.split(), if d > 128 { 2 } else { 1 }, "d{d}");
            }
        }
        // d128 on an A100: K, V 32 KiB each, 2 x (Q, dO) 16 KiB each, dS^T 16 KiB, stats 1 KiB.
        let t = mma_bwd_tiles(128, a100).unwrap();
        assert_eq!((t.block_m, t.block_n, t.warps, t.stages), (64, 128, 8, 2));
        assert_eq!(t.smem_bytes(128), 2 * 32768 + 4 * 16384 + 16384 + 1024);
        // 99 KiB GPUs fall back to smaller tiles.
        let t = mma_bwd_tiles(128, rtx).unwrap();
        assert_eq!((t.block_m, t.block_n, t.warps, t.stages), (64, 64, 4, 1));
        let t = mma_bwd_tiles(256, rtx).unwrap();
        assert_eq!((t.block_m, t.block_n, t.warps), (32, 32, 4));
        assert_eq!(t.smem_bytes(256), 4 * 16384 + 2 * 2048 + 256);
        let e = mma_bwd_tiles(256, 48 * 1024).unwrap_err();
        assert!(e.contains("head_dim 256 needs"), "{e}");
        assert!(mma_bwd_tiles(96, a100).is_err());
    }

    #[test]
    fn tile_checks_refuse_shapes_the_kernel_cannot_take() {
        let t = MmaBwdTiles::new;
        assert!(t(64, 128, 8, 2, 64).check(64).is_ok());
        assert!(
            t(64, 96, 8, 2, 64).check(64).is_err(),
            "not 16 keys per warp or pair"
        );
        assert!(
            t(64, 32, 8, 2, 64).check(64).is_err(),
            "four warps per key tile"
        );
        assert!(t(48, 64, 4, 2, 64).check(64).is_err(), "not a copy sweep");
        assert!(t(64, 64, 4, 3, 64).check(64).is_err(), "three stages");
        assert!(t(64, 64, 4, 2, 24).check(64).is_err(), "dq key steps of 16");
        assert!(t(64, 64, 4, 2, 64).check(96).is_err(), "buckets of 64");
        assert!(t(64, 64, 8, 1, 32).check(256).is_ok());
        assert!(
            t(16, 32, 4, 1, 32).check(256).is_err(),
            "8 queries per warp"
        );
    }

    #[test]
    fn launches() {
        let s = BwdShape {
            batch: 2,
            heads_q: 8,
            heads_kv: 2,
            q_tokens: 2 * 300,
            head_dim: 72,
            max_q_len: 300,
            max_k_len: 500,
        };
        let l = per_head_launch(&s, PerHead::Keys, 128, 256, 1000)
            .unwrap()
            .unwrap();
        assert_eq!((l.grid, l.block, l.smem), ((4, 2, 2), 256, 1000));
        let l = per_head_launch(&s, PerHead::Queries, 128, 256, 10)
            .unwrap()
            .unwrap();
        assert_eq!(l.grid, (3, 8, 2));
        let l = prep_launch(&s).unwrap().unwrap();
        assert_eq!((l.grid, l.block), ((600 * 8 / 4, 1, 1), 128));
        let l = post_launch(&s).unwrap().unwrap();
        assert_eq!(l.grid, ((600 * 8 * 72usize).div_ceil(256) as u32, 1, 1));
        // Nothing to launch for empty grids; too many heads for a grid side is an error.
        let empty = BwdShape { max_k_len: 0, ..s };
        assert_eq!(
            per_head_launch(&empty, PerHead::Keys, 128, 256, 0).unwrap(),
            None
        );
        let wide = BwdShape {
            heads_kv: 70_000,
            ..s
        };
        assert!(per_head_launch(&wide, PerHead::Keys, 128, 256, 0)
            .unwrap_err()
            .contains("heads_kv"));
        let huge = BwdShape {
            q_tokens: 1 << 40,
            ..s
        };
        assert_eq!(post_launch(&huge).unwrap().unwrap().grid.0, 1 << 20);
    }
}
