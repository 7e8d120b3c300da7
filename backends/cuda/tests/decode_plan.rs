//! Host-side launch arithmetic of a decode call (no GPU): the kernel family and tiles chosen,
//! the split count, the packed-row tile, the append launches (one per colliding batch entry),
//! the combine, the compact rotary tables and the workspace sizes.

use flashattn_core::testing::decode::{contiguous, paged, rotary, spec};
use flashattn_core::{DType, KvCache};
use flashattn_cuda::{decode_plan, select_decode, smem_optin_of_arch, KernelKind};

const A100_SMS: usize = 108;

fn plan_of(s: &flashattn_core::AttentionSpec, kind: KernelKind) -> flashattn_cuda::DecodePlan {
    let c = s.validate().unwrap();
    let v = select_decode(&c, (8, 0), smem_optin_of_arch("sm_80"), kind).unwrap();
    decode_plan(&c, &v, A100_SMS).unwrap()
}

#[test]
fn the_goal_shape_splits_across_the_gpu_and_combines() {
    // 1 query x 32k keys + 1 new, 32/8 heads, d128, bf16, page 16.
    let s = spec(32, 8, 1, 128, paged(&[32_767], 1, 16, 0)).dtype(DType::Bf16);
    let p = plan_of(&s, KernelKind::DecodeMma);
    assert_eq!(p.variant.name(), "decode_mma_bf16_d128_64x3");
    // 4 packed rows per KV head: the 16-row tile; 8 CTAs per chunk, 2 per SM: 27 chunks.
    assert_eq!(p.variant.entry_points()[p.split_entry], "fa_decode_mma_w1");
    assert_eq!(p.params.rows, 4);
    assert_eq!(p.params.num_splits, 27);
    assert_eq!(p.split.grid.0, 8 * 27u32);
    let combine = p.combine.expect("several chunks are combined");
    assert_eq!(combine.grid.0, 8, "4 output rows per CTA");
    assert_eq!((p.part_out, p.part_lse), (27 * 32 * 128, 27 * 32));
    assert_eq!(p.appends.len(), 1);
    assert_eq!(p.appends[0].launch.grid.0, 1);
    assert_eq!(p.tables.block_table.len(), 32_768usize.div_ceil(16));
}

#[test]
fn short_caches_and_many_sequences_run_one_chunk_without_combine() {
    let s = spec(8, 2, 1, 64, contiguous(&[100; 64], 0, 0)).dtype(DType::F16);
    let p = plan_of(&s, KernelKind::DecodeMma);
    assert_eq!(p.params.num_splits, 1);
    assert!(p.combine.is_none());
    assert!(p.appends.is_empty(), "nothing new: no append launch");
    assert_eq!((p.part_out, p.part_lse), (0, 0));
}

#[test]
fn more_than_16_packed_rows_take_the_64_row_tile() {
    let s = spec(32, 8, 5, 128, contiguous(&[1000], 5, 0)).dtype(DType::Bf16);
    let p = plan_of(&s, KernelKind::DecodeMma);
    assert_eq!(p.params.rows, 20);
    assert_eq!(p.params.row_blocks, 1);
    assert_eq!(p.variant.entry_points()[p.split_entry], "fa_decode_mma_w4");
    let simt = plan_of(&s.clone().dtype(DType::F32), KernelKind::DecodeSimt);
    assert_eq!(simt.params.row_blocks, 2, "16-row tiles on CUDA cores");
}

#[test]
fn rotary_tables_hold_only_the_rotated_positions() {
    // Causal, 3 query rows and 3 new rows at 40 and 0: positions 40..43 and 0..3.
    let s = spec(
        4,
        2,
        3,
        64,
        paged(&[40, 0], 3, 16, 0).rotary(rotary(64, 43, true)),
    )
    .dtype(DType::Bf16);
    let p = plan_of(&s, KernelKind::DecodeMma);
    let full = rotary(64, 43, true);
    assert_eq!(p.params.rot_span, 3);
    assert_eq!(p.tables.rot_cos.len(), 2 * 3 * 32);
    assert_eq!(&p.tables.rot_cos[..96], &full.cos[40 * 32..43 * 32]);
    assert_eq!(&p.tables.rot_sin[96..], &full.sin[..3 * 32]);
    assert!(p.appends[0].rotate_q);
    // 2 entries x 3 new rows, then 2 x 3 q rows.
    assert_eq!(p.appends[0].launch.grid.0, 12);
    assert_eq!(p.q_rot, s.validate().unwrap().sizes.q);
}

#[test]
fn entries_that_write_the_same_row_append_one_at_a_time() {
    // Two sequences share page 0 (allowed: only a sequence's own pages must be distinct).
    let cache = KvCache::paged(2, 4, vec![0, 1, 0, 1], 2, vec![2, 2]).seqlen_new(1);
    let s = spec(2, 1, 1, 64, cache).dtype(DType::Bf16);
    let p = plan_of(&s, KernelKind::DecodeMma);
    let order: Vec<(usize, usize)> = p.appends.iter().map(|a| (a.b0, a.batches)).collect();
    assert_eq!(order, [(0, 1), (1, 1)]);
}

#[test]
fn refusals_name_the_reason() {
    let s = spec(4, 2, 1, 64, contiguous(&[10], 1, 0)).dtype(DType::F32);
    let c = s.validate().unwrap();
    let e = select_decode(&c, (8, 0), 166_912, KernelKind::DecodeMma).unwrap_err();
    assert!(e.contains("bf16 or f16"), "{e}");
    let e = select_decode(&c, (7, 5), 166_912, KernelKind::DecodeSimt).unwrap_err();
    assert!(e.contains("sm_80"), "{e}");
    let no_cache = flashattn_core::AttentionSpec::new(1, 1, 1, 8, 64);
    let e = select_decode(
        &no_cache.validate().unwrap(),
        (8, 0),
        166_912,
        KernelKind::DecodeSimt,
    )
    .unwrap_err();
    assert!(e.contains("KV cache"), "{e}");
}
