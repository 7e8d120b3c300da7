// Naive attention for benchmarks: materialises the full score matrix in device memory, as a
// framework without a fused kernel would. Two kernels:
//   naive_scores:     S[b, h, i, j] = masked, modded score (f32), one thread per (i, j);
//   naive_softmax_pv: one warp per row: softmax of S's row, LSE, then out = P V.
// Dense layouts only. Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh.
// Compile-time: FA_DTYPE.

// grid: (ceil(seqlen_k / 128), seqlen_q, batch * heads_q); block 128.
extern "C" __global__ void naive_scores(const Params p, float* scores) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    const int b = blockIdx.z / p.heads_q, h = blockIdx.z % p.heads_q;
    if (j >= p.seqlen_k) return;
    const int d = p.head_dim, kv_h = h / p.group;
    const elem_t* q = (const elem_t*)p.q + ((uint64_t)(b * p.seqlen_q + i) * p.heads_q + h) * d;
    const elem_t* k = (const elem_t*)p.k + ((uint64_t)(b * p.seqlen_k + j) * p.heads_kv + kv_h) * d;
    int lo, hi;
    mask_keys(p, i, p.seqlen_q, p.seqlen_k, lo, hi);
    float sc = NEG_INF;
    if (j >= lo && j < hi) {
        float dot = 0.f;
        for (int c = 0; c < d; ++c) dot += load_elem(q, c) * load_elem(k, c);
        sc = score_mod(p, dot, alibi_slope(p, b, h), i, j, p.seqlen_q, p.seqlen_k);
    }
    scores[((uint64_t)blockIdx.z * p.seqlen_q + i) * p.seqlen_k + j] = sc;
}

// grid: (ceil(seqlen_q / 4), batch * heads_q); block 128 (4 warps, one row each).
extern "C" __global__ void naive_softmax_pv(const Params p, const float* scores) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = blockIdx.x * 4 + warp;
    if (i >= p.seqlen_q) return;
    const int b = blockIdx.y / p.heads_q, h = blockIdx.y % p.heads_q, kv_h = h / p.group;
    const float* row = scores + ((uint64_t)blockIdx.y * p.seqlen_q + i) * p.seqlen_k;
    float mx = NEG_INF;
    for (int j = lane; j < p.seqlen_k; j += 32) mx = fmaxf(mx, row[j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    float sum = 0.f;
    if (mx != NEG_INF)
        for (int j = lane; j < p.seqlen_k; j += 32) sum += __expf(row[j] - mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int dv = p.head_dim_v;
    const elem_t* v = (const elem_t*)p.v;
    elem_t* out = (elem_t*)p.out;
    const uint64_t orow = ((uint64_t)(b * p.seqlen_q + i) * p.heads_q + h) * dv;
    for (int c = lane; c < dv; c += 32) {
        float acc = 0.f;
        if (mx != NEG_INF)
            for (int j = 0; j < p.seqlen_k; ++j)
                acc += __expf(row[j] - mx) * load_elem(v, ((uint64_t)(b * p.seqlen_k + j) * p.heads_kv + kv_h) * dv + c);
        store_elem(out, orow + c, acc * inv);
    }
    if (p.lse && lane == 0) p.lse[lse_index(p, b, h, 0, i)] = sum > 0.f ? mx + __logf(sum) : NEG_INF;
}
