//! Host-side launch arithmetic of a decode call (no GPU): the kernel family and tiles chosen,
//! the split count, the packed-row tile, the append launches (one per colliding batch entry),
//! the combine, the compact rotary tables and the workspace sizes; the plan from bounds (the
//! real lengths on the device) and the layout of a caller's scratch.

use flashattn_core::testing::decode::{contiguous, paged, rotary, spec};
use flashattn_core::{DType, KvCache};
use flashattn_cuda::{
    decode_bounds, decode_plan, decode_plan_from_bounds, scratch_layout, select_decode,
    smem_optin_of_arch, KernelKind,
};

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

fn bounds_plan_of(s: &flashattn_core::AttentionSpec) -> flashattn_cuda::DecodePlan {
    let c = s.validate().unwrap();
    let v = select_decode(
        &c,
        (8, 0),
        smem_optin_of_arch("sm_80"),
        KernelKind::DecodeMma,
    )
    .unwrap();
    decode_plan_from_bounds(&c, &v, A100_SMS).unwrap()
}

#[test]
fn a_plan_from_bounds_indexes_rotary_by_position_and_splits_like_the_bound() {
    // Bounds 40 and 40 (real lengths unknown): rows up to 40 + 3 of the whole tables.
    let bounds = decode_bounds(2, 40).unwrap();
    let cache = paged(&bounds, 3, 16, 5).rotary(rotary(64, 50, true));
    let s = spec(4, 2, 3, 64, cache).dtype(DType::Bf16);
    let p = bounds_plan_of(&s);
    let full = rotary(64, 50, true);
    assert_eq!(p.params.rot_span, 0, "cos / sin row = position");
    assert_eq!(p.tables.rot_cos, full.cos[..43 * 32]);
    assert_eq!(p.tables.rot_sin, full.sin[..43 * 32]);
    // The split count is the exact plan's at the bound.
    let long = spec(32, 8, 1, 128, paged(&[32_767], 1, 16, 0)).dtype(DType::Bf16);
    let (exact, bound) = (plan_of(&long, KernelKind::DecodeMma), bounds_plan_of(&long));
    assert_eq!(bound.params.num_splits, exact.params.num_splits);
    assert_eq!(
        (bound.part_out, bound.part_lse),
        (exact.part_out, exact.part_lse)
    );
}

#[test]
fn a_plan_from_bounds_appends_one_by_one_where_a_page_may_be_shared() {
    // Entry 1's pages are 2, 0: the host lengths 2 and 1 write rows apart (the exact plan
    // appends in one launch), but real lengths up to the bounds may reach page 0 from both.
    let cache = KvCache::paged(3, 4, vec![0, 1, 2, 0], 2, vec![2, 5]).seqlen_new(1);
    let s = spec(2, 1, 1, 64, cache).dtype(DType::Bf16);
    assert_eq!(plan_of(&s, KernelKind::DecodeMma).appends.len(), 1);
    let order: Vec<(usize, usize)> = bounds_plan_of(&s)
        .appends
        .iter()
        .map(|a| (a.b0, a.batches))
        .collect();
    assert_eq!(order, [(0, 1), (1, 1)]);
    // Distinct pages (and any contiguous cache): one launch.
    let apart = KvCache::paged(4, 4, vec![0, 1, 2, 3], 2, vec![2, 5]).seqlen_new(1);
    let s = spec(2, 1, 1, 64, apart).dtype(DType::Bf16);
    assert_eq!(bounds_plan_of(&s).appends.len(), 1);
    let s = spec(2, 1, 1, 64, contiguous(&[9, 9], 1, 0)).dtype(DType::Bf16);
    assert_eq!(bounds_plan_of(&s).appends.len(), 1);
}

#[test]
fn the_scratch_layout_holds_each_part_aligned_and_apart() {
    // Rotated q (bf16, odd size), partial outs and LSEs of a split plan.
    let cache = contiguous(&[3000], 1, 0).rotary(rotary(64, 3001, false));
    let s = spec(6, 2, 1, 72, cache).dtype(DType::Bf16);
    let p = bounds_plan_of(&s);
    assert!(p.params.num_splits > 1 && p.q_rot > 0);
    let (offsets, bytes) = scratch_layout(&p);
    let sizes = [p.q_rot * 2, p.part_out * 4, p.part_lse * 4];
    for i in 0..3 {
        assert_eq!(offsets[i] % 16, 0, "part {i} at {}", offsets[i]);
        let end = offsets[i] + sizes[i];
        assert!(
            end <= offsets.get(i + 1).copied().unwrap_or(bytes),
            "part {i} overlaps"
        );
    }
    assert!(bytes < sizes.iter().sum::<usize>() + 48);
    // One chunk, no rotary: no scratch.
    let s = spec(8, 2, 1, 64, contiguous(&[100; 64], 0, 0)).dtype(DType::F16);
    assert_eq!(scratch_layout(&bounds_plan_of(&s)).1, 0);
}
