// The backward's pre- and post-processing kernels, shared by every backward family:
//   fa_bwd_prep: delta = rowsum(dout * out) per (token, head), in the LSE's layout, and the f32
//                dq accumulator's rows zeroed (when there is one: atomic dq);
//   fa_bwd_post: dq = scale * the accumulator, in the input dtype.
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, bwd.cuh. Compile-time: FA_DTYPE.

#define PREP_WARPS 4  // rows per CTA of fa_bwd_prep (src/backward/tiles.rs: PREP_THREADS)

// grid: ceil(q_tokens * heads_q / PREP_WARPS); block: 32 * PREP_WARPS. One warp per row.
extern "C" __global__ void __launch_bounds__(PREP_WARPS * 32)
    fa_bwd_prep(const Params p, const elem_t* dout, float* delta, float* dq_accum) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * PREP_WARPS + warp;
    if (row >= (long long)q_tokens(p) * p.heads_q) return;
    const int tok = (int)(row / p.heads_q), h = (int)(row % p.heads_q);
    const int dv = p.head_dim_v, d = p.head_dim;
    const elem_t* out = (const elem_t*)p.out;
    float acc = 0.f;
    // Dense token tok is row tok % seqlen_q of sequence tok / seqlen_q; varlen rows go by token.
    const int b = p.cu_seqlens_q ? 0 : tok / p.seqlen_q, start = b * p.seqlen_q;
    const uint64_t o_at = strided_row(p, p.o_strides, b, start, tok - start, h);
    const uint64_t do_at = strided_row(p, p.do_strides, b, start, tok - start, h);
    for (int c = lane; c < dv; c += 32) acc += load_elem(out, o_at + c) * load_elem(dout, do_at + c);
    acc = warp_sum(acc);
    // lse_index without the batch entry: varlen rows are [heads, total], dense [batch, heads, seqlen].
    const uint64_t at = p.cu_seqlens_q ? (uint64_t)h * p.seqlen_q + tok
                                       : ((uint64_t)(tok / p.seqlen_q) * p.heads_q + h) * p.seqlen_q + tok % p.seqlen_q;
    if (lane == 0) delta[at] = acc;
    if (dq_accum)
        for (int c = lane; c < d; c += 32) dq_accum[row * d + c] = 0.f;
}

// grid: up to 2^20 CTAs striding over q's elements; block: 256.
extern "C" __global__ void __launch_bounds__(256) fa_bwd_post(const Params p, const float* dq_accum, elem_t* dq) {
    const uint64_t n = (uint64_t)q_tokens(p) * p.heads_q * p.head_dim;
    for (uint64_t x = (uint64_t)blockIdx.x * 256 + threadIdx.x; x < n; x += (uint64_t)gridDim.x * 256)
        store_elem(dq, x, dq_accum[x] * p.scale);
}
