//! The kernels' parameter block, built from a spec; mirrors `struct Params` in
//! kernels/common.cuh field for field.

use crate::compile::BACKEND;
use flashattn_core::{AttentionSpec, Error, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelParams {
    pub out: u64,
    pub lse: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    pub alibi: u64,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub batch: i32,
    pub heads_q: i32,
    pub heads_kv: i32,
    pub group: i32,
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    pub head_dim: i32,
    pub head_dim_v: i32,
    pub num_m_blocks: i32,
    pub total_tiles: i32,
    pub win_left: i32,
    pub win_right: i32,
    pub alibi_per_batch: i32,
    /// Hopper tile order (see `tiles::head_major_order`); set by the launcher.
    pub head_major_tiles: i32,
    pub scale: f32,
    pub softcap: f32,
}

/// Longest query sequence of the batch.
pub fn max_seqlen_q(spec: &AttentionSpec) -> usize {
    (0..spec.batch)
        .map(|b| spec.seq(b).q_len)
        .max()
        .unwrap_or(0)
}

fn to_i32(field: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Unsupported {
        backend: BACKEND,
        reason: format!("{field} = {v} exceeds the kernels' 32-bit index range"),
    })
}

impl KernelParams {
    /// Shapes, mask and score mods of `spec` (pointers left 0) for query blocks of `block_m`.
    pub fn from_spec(spec: &AttentionSpec, block_m: usize) -> Result<KernelParams> {
        let mask = spec.mask();
        let (left, right) = (mask.left, mask.right);
        let num_m_blocks = max_seqlen_q(spec).div_ceil(block_m);
        let total_tiles = num_m_blocks * spec.heads_q * spec.batch;
        // Token indices times heads must fit the kernels' int arithmetic.
        to_i32(
            "tokens x heads",
            spec.q_tokens()
                .unwrap_or(usize::MAX)
                .saturating_mul(spec.heads_q),
        )?;
        to_i32(
            "tokens x heads",
            spec.k_tokens()
                .unwrap_or(usize::MAX)
                .saturating_mul(spec.heads_kv),
        )?;
        Ok(KernelParams {
            batch: to_i32("batch", spec.batch)?,
            heads_q: to_i32("heads_q", spec.heads_q)?,
            heads_kv: to_i32("heads_kv", spec.heads_kv)?,
            group: to_i32("group", spec.group_size())?,
            seqlen_q: to_i32("seqlen_q", spec.seqlen_q)?,
            seqlen_k: to_i32("seqlen_k", spec.seqlen_k)?,
            head_dim: spec.head_dim as i32,
            head_dim_v: spec.head_dim_v as i32,
            num_m_blocks: to_i32("query blocks", num_m_blocks)?,
            total_tiles: to_i32("tiles", total_tiles)?,
            win_left: left.map_or(Ok(-1), |l| {
                to_i32("window.left", l.min(i32::MAX as u64) as usize)
            })?,
            win_right: right.map_or(Ok(-1), |r| {
                to_i32("window.right", r.min(i32::MAX as u64) as usize)
            })?,
            alibi_per_batch: spec.alibi.as_ref().is_some_and(|a| a.per_batch) as i32,
            scale: spec.scale_value(),
            softcap: spec.softcap,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_cuda_struct() {
        // 8 pointers, 13 ints, 2 floats, padded to 8.
        assert_eq!(
            std::mem::size_of::<KernelParams>(),
            8 * 8 + 13 * 4 + 2 * 4 + 4
        );
        assert_eq!(std::mem::align_of::<KernelParams>(), 8);
    }

    #[test]
    fn folds_causal_into_the_window() {
        let spec = AttentionSpec::new(2, 4, 300, 500, 64)
            .causal(true)
            .window(16, -1)
            .heads_kv(2);
        let p = KernelParams::from_spec(&spec, 128).unwrap();
        assert_eq!((p.win_left, p.win_right), (16, 0));
        assert_eq!(p.group, 2);
        assert_eq!(p.num_m_blocks, 3);
        assert_eq!(p.total_tiles, 3 * 4 * 2);
        let spec = AttentionSpec::new(1, 1, 8, 8, 64);
        let p = KernelParams::from_spec(&spec, 128).unwrap();
        assert_eq!((p.win_left, p.win_right), (-1, -1));
        assert!((p.scale - 0.125).abs() < 1e-7);
    }

    #[test]
    fn varlen_blocks_follow_the_longest_sequence() {
        let spec = AttentionSpec::new(1, 2, 300, 300, 64)
            .varlen(vec![0, 10, 290, 300], vec![0, 100, 200, 300]);
        let p = KernelParams::from_spec(&spec, 128).unwrap();
        assert_eq!(p.num_m_blocks, 3); // 280 rows
        assert_eq!(p.batch, 3);
    }
}
