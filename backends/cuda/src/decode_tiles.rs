//! Tiles of the decode kernels (kernels/decode_mma.cu, decode_simt.cu) and the launch
//! arithmetic of a decode call: head-dim buckets, the cp.async ring's depth, the packed-row
//! tiles, and how many chunks the keys of each (batch, KV head) are split into.

use crate::variants::KernelKind;
use flashattn_core::DType;

/// Head dims the decode kernels are compiled for; a problem runs in the smallest that holds
/// head_dim and head_dim_v (zero-padded in shared memory, extra k-steps skipped). Decode reads
/// only the real columns from memory, so a coarse bucket costs shared memory, not bandwidth.
pub const DECODE_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Warps of every decode CTA.
pub const DECODE_WARPS: usize = 4;

/// Most chunks per (batch, KV head): the combine kernel keeps one weight per chunk per lane
/// (kernels/decode.cuh MAX_SPLITS).
pub const MAX_SPLITS: usize = 128;

/// Fewest key blocks in a chunk: a chunk streams at least this many blocks through its ring,
/// so the pipeline fills before the chunk ends.
pub const MIN_BLOCKS_PER_SPLIT: usize = 4;

/// CTAs of a decode launch per SM that the chunk count aims for: two resident CTAs keep one
/// CTA's copies in flight while the other computes (a choice by reasoning, not measured yet).
pub const CTAS_PER_SM: usize = 2;

/// The decode bucket of a problem, or `None` past 256.
pub fn decode_head_dim(head_dim: usize, head_dim_v: usize) -> Option<usize> {
    let d = head_dim.max(head_dim_v);
    DECODE_HEAD_DIMS.into_iter().find(|&b| b >= d)
}

/// One decode kernel configuration: `block_n` cache rows per key block, `stages` blocks in the
/// cp.async ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeTiles {
    pub block_n: usize,
    pub stages: usize,
}

/// Packed rows (query heads of one KV head x seqlen_q) per CTA of a decode kernel, and the
/// split kernel's entry point (index into the family's `entry_points`).
pub fn tile_rows(kind: KernelKind, rows: usize) -> (usize, usize) {
    match kind {
        // 16 rows: the 4 warps split each key block; more: 64 rows, a 16-row slice per warp.
        KernelKind::DecodeMma if rows <= 16 => (16, 2),
        KernelKind::DecodeMma => (64, 3),
        _ => (16, 2),
    }
}

/// Bytes of one key block (its K and V rows) in shared memory.
fn stage_bytes(kind: KernelKind, dtype: DType, head_dim: usize, block_n: usize) -> usize {
    match kind {
        // XOR-swizzled 16-bit rows.
        KernelKind::DecodeMma => 2 * block_n * head_dim * 2,
        // Rows padded by 16 bytes, in the cache's dtype.
        _ => 2 * block_n * (head_dim * dtype.size_bytes() + 16),
    }
}

impl DecodeTiles {
    /// Dynamic shared memory of a CTA with `rows` packed q rows: the ring, then q (16-bit in
    /// the mma kernel, f32 in the CUDA-core one). The mma kernel's end-of-loop merge reuses it.
    pub fn smem_bytes(
        &self,
        kind: KernelKind,
        dtype: DType,
        head_dim: usize,
        rows: usize,
    ) -> usize {
        let q = match kind {
            KernelKind::DecodeMma => rows * head_dim * 2,
            _ => rows * head_dim * 4,
        };
        self.stages * stage_bytes(kind, dtype, head_dim, self.block_n) + q
    }
}

/// The tiles of decode kernel `kind` for `dtype` and bucket `head_dim` on a GPU whose blocks
/// may use `smem_optin` bytes: key blocks of about 32 KiB of K and V (mma: 128 rows at d64, 64
/// above; CUDA cores: 32 rows, one per lane), and the deepest ring of 3, 2 or 1 blocks that fits
/// with the largest q tile. Not measured on a GPU yet.
pub fn decode_tiles(
    kind: KernelKind,
    dtype: DType,
    head_dim: usize,
    smem_optin: usize,
) -> Result<DecodeTiles, String> {
    if !DECODE_HEAD_DIMS.contains(&head_dim) {
        return Err(format!("no decode kernel for head_dim bucket {head_dim}"));
    }
    let (block_n, rows) = match kind {
        KernelKind::DecodeMma if head_dim == 64 => (128, 64),
        KernelKind::DecodeMma => (64, 64),
        KernelKind::DecodeSimt => (32, 16),
        k => return Err(format!("{k:?} is not a decode kernel")),
    };
    [3, 2, 1]
        .into_iter()
        .map(|stages| DecodeTiles { block_n, stages })
        .find(|t| t.smem_bytes(kind, dtype, head_dim, rows) <= smem_optin)
        .ok_or_else(|| {
            format!(
                "decode at head_dim {head_dim} ({dtype}) needs {} bytes of shared memory, this GPU allows {smem_optin}",
                DecodeTiles { block_n, stages: 1 }.smem_bytes(kind, dtype, head_dim, rows)
            )
        })
}

/// Chunks the keys of each (batch, KV head) are split into: enough CTAs to give every SM
/// `CTAS_PER_SM` of them (`ctas` per chunk: batch x KV heads x row blocks), at least
/// `MIN_BLOCKS_PER_SPLIT` of the longest sequence's `key_blocks` per chunk, at most
/// `MAX_SPLITS`. One chunk writes the output directly (no combine).
pub fn num_splits(key_blocks: usize, ctas: usize, sm_count: usize) -> usize {
    let wanted = (CTAS_PER_SM * sm_count.max(1)).div_ceil(ctas.max(1));
    let most = key_blocks.div_ceil(MIN_BLOCKS_PER_SPLIT).min(MAX_SPLITS);
    wanted.min(most).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiles::smem_optin_of_arch;

    #[test]
    fn buckets_hold_both_head_dims() {
        assert_eq!(decode_head_dim(1, 1), Some(64));
        assert_eq!(decode_head_dim(72, 40), Some(128));
        assert_eq!(decode_head_dim(128, 200), Some(256));
        assert_eq!(decode_head_dim(257, 8), None);
    }

    #[test]
    fn tiles_fit_every_ci_arch_and_use_the_deepest_ring() {
        let mma = KernelKind::DecodeMma;
        let simt = KernelKind::DecodeSimt;
        for arch in ["sm_80", "sm_86", "sm_89", "sm_90a"] {
            let smem = smem_optin_of_arch(arch);
            for d in DECODE_HEAD_DIMS {
                for dtype in [DType::Bf16, DType::F16] {
                    let t = decode_tiles(mma, dtype, d, smem).unwrap();
                    assert!(t.smem_bytes(mma, dtype, d, 64) <= smem, "{arch} d{d}");
                    // The merge (4 warps x 16 rows x (d + 2) f32) fits the 16-row CTA's memory.
                    assert!(4 * 16 * (d + 2) * 4 <= t.smem_bytes(mma, dtype, d, 16));
                    assert_eq!(t.block_n % 64, 0, "4 warps x 16-key slices");
                }
                for dtype in [DType::F32, DType::F16, DType::Bf16] {
                    let t = decode_tiles(simt, dtype, d, smem).unwrap();
                    assert!(t.smem_bytes(simt, dtype, d, 16) <= smem, "{arch} d{d}");
                    assert_eq!(t.block_n, 32);
                }
            }
        }
        // d128 bf16: 3 blocks of 64 rows x 2 x 256 bytes + 64 q rows on an A100; an RTX 4090's
        // 99 KiB takes 2.
        let a100 = decode_tiles(mma, DType::Bf16, 128, smem_optin_of_arch("sm_80")).unwrap();
        assert_eq!((a100.block_n, a100.stages), (64, 3));
        assert_eq!(
            a100.smem_bytes(mma, DType::Bf16, 128, 64),
            3 * 32768 + 16384
        );
        let rtx = decode_tiles(mma, DType::Bf16, 128, smem_optin_of_arch("sm_89")).unwrap();
        assert_eq!(rtx.stages, 2);
        // d256 on 99 KiB: one block in flight per CTA.
        let d256 = decode_tiles(mma, DType::Bf16, 256, smem_optin_of_arch("sm_86")).unwrap();
        assert_eq!(d256.stages, 1);
        // f32 d256 rows are 1040 bytes apart in the CUDA-core kernel.
        let f32 = decode_tiles(simt, DType::F32, 256, smem_optin_of_arch("sm_80")).unwrap();
        assert_eq!(
            f32.smem_bytes(simt, DType::F32, 256, 16),
            f32.stages * 2 * 32 * 1040 + 16 * 256 * 4
        );
        assert!(decode_tiles(mma, DType::Bf16, 96, 1 << 20).is_err());
        assert!(decode_tiles(mma, DType::Bf16, 256, 32 * 1024).is_err());
        assert!(decode_tiles(KernelKind::Mma, DType::Bf16, 64, 1 << 20).is_err());
    }

    #[test]
    fn packed_rows_pick_the_tile() {
        assert_eq!(tile_rows(KernelKind::DecodeMma, 4), (16, 2));
        assert_eq!(tile_rows(KernelKind::DecodeMma, 16), (16, 2));
        assert_eq!(tile_rows(KernelKind::DecodeMma, 17), (64, 3));
        assert_eq!(tile_rows(KernelKind::DecodeSimt, 40), (16, 2));
    }

    #[test]
    fn splits_fill_the_gpu_but_keep_chunks_long() {
        // 1 x 32k keys, 8 KV heads, 64-key blocks, 132 SMs: 33 chunks of 16 blocks.
        assert_eq!(num_splits(512, 8, 132), 33);
        // Many sequences fill the GPU alone.
        assert_eq!(num_splits(512, 64 * 8, 132), 1);
        // Short caches: at least 4 blocks per chunk.
        assert_eq!(num_splits(16, 8, 132), 4);
        assert_eq!(num_splits(3, 8, 132), 1);
        assert_eq!(num_splits(0, 8, 132), 1);
        // Never past MAX_SPLITS.
        assert_eq!(num_splits(1 << 20, 1, 1000), MAX_SPLITS);
    }
}
