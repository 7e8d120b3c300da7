// Portable FlashAttention forward for any NVIDIA GPU (sm_70+) and any shape the spec allows:
// every head_dim / head_dim_v up to 256, f32 / f16 / bf16, all masks and score mods, varlen.
// Used on non-Hopper GPUs and for shapes the Hopper kernel does not cover. Plain CUDA cores:
// correct and simple rather than fast.
//
// A block of 4 warps owns 16 query rows (4 per warp). Key/value blocks of 32 rows are staged
// in shared memory as f32. For each of its rows a warp computes 32 scores at once (lane j
// takes key j), folds them into the online softmax with warp reductions, then accumulates
// P V with each lane owning the output dimensions lane, lane + 32, ...
// Prepended: common.cuh. Compile-time: FA_DTYPE.

#define G_ROWS_PER_WARP 4
#define G_WARPS 4
#define G_BLOCK_M (G_ROWS_PER_WARP * G_WARPS)
#define G_BLOCK_N 32
#define G_MAX_DV_PER_LANE 8   // 256 / 32

DEV float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}
DEV float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

// grid: (num_m_blocks, heads_q, batch); dynamic shared memory: see generic_smem_bytes in Rust.
extern "C" __global__ void __launch_bounds__(128) fa_generic_fwd(const Params p) {
    extern __shared__ float smem[];
    const int d = p.head_dim, dv = p.head_dim_v;
    float* sq = smem;                          // [G_BLOCK_M][d]
    float* sk = sq + G_BLOCK_M * d;            // [G_BLOCK_N][d + 1]  (+1: no bank conflicts)
    float* sv = sk + G_BLOCK_N * (d + 1);      // [G_BLOCK_N][dv]

    const int b = blockIdx.z, h = blockIdx.y;
    const SeqInfo s = seq_info(p, b);
    const int m0 = blockIdx.x * G_BLOCK_M;
    if (m0 >= s.q_len) return;
    const int m1 = min(m0 + G_BLOCK_M, s.q_len);
    const int kv_h = h / p.group;
    const elem_t* q = (const elem_t*)p.q;
    const elem_t* k = (const elem_t*)p.k;
    const elem_t* v = (const elem_t*)p.v;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float slope = alibi_slope(p, b, h);

    for (int x = threadIdx.x; x < G_BLOCK_M * d; x += blockDim.x) {
        int r = x / d, c = x % d;
        sq[x] = m0 + r < s.q_len ? load_elem(q, ((uint64_t)(s.q_start + m0 + r) * p.heads_q + h) * d + c) : 0.f;
    }

    float o[G_ROWS_PER_WARP][G_MAX_DV_PER_LANE];
    float m_run[G_ROWS_PER_WARP], l_run[G_ROWS_PER_WARP];
    int lo[G_ROWS_PER_WARP], hi[G_ROWS_PER_WARP];
#pragma unroll
    for (int t = 0; t < G_ROWS_PER_WARP; ++t) {
        m_run[t] = NEG_INF;
        l_run[t] = 0.f;
#pragma unroll
        for (int x = 0; x < G_MAX_DV_PER_LANE; ++x) o[t][x] = 0.f;
        key_range(p, m0 + warp * G_ROWS_PER_WARP + t, s.q_len, s.k_len, lo[t], hi[t]);
    }

    int n_lo, n_hi;
    block_range(p, m0, m1, s.q_len, s.k_len, G_BLOCK_N, n_lo, n_hi);
    for (int n = n_lo; n < n_hi; ++n) {
        const int j0 = n * G_BLOCK_N;
        __syncthreads();  // previous block fully consumed (and sq written, first time)
        for (int x = threadIdx.x; x < G_BLOCK_N * d; x += blockDim.x) {
            int r = x / d, c = x % d;
            sk[r * (d + 1) + c] =
                j0 + r < s.k_len ? load_elem(k, ((uint64_t)(s.k_start + j0 + r) * p.heads_kv + kv_h) * d + c) : 0.f;
        }
        for (int x = threadIdx.x; x < G_BLOCK_N * dv; x += blockDim.x) {
            int r = x / dv, c = x % dv;
            sv[x] = j0 + r < s.k_len ? load_elem(v, ((uint64_t)(s.k_start + j0 + r) * p.heads_kv + kv_h) * dv + c) : 0.f;
        }
        __syncthreads();

#pragma unroll
        for (int t = 0; t < G_ROWS_PER_WARP; ++t) {
            const int r = warp * G_ROWS_PER_WARP + t;
            const int i = m0 + r;
            if (i >= s.q_len) continue;  // uniform across the warp
            const int j = j0 + lane;
            float sc = NEG_INF;
            if (j < s.k_len && j >= lo[t] && j < hi[t]) {
                float dot = 0.f;
                for (int c = 0; c < d; ++c) dot += sq[r * d + c] * sk[lane * (d + 1) + c];
                sc = score_mod(p, dot, slope, i, j, s.q_len, s.k_len);
            }
            const float mx = fmaxf(m_run[t], warp_max(sc));
            if (mx == NEG_INF) continue;  // nothing visible yet
            const float corr = __expf(m_run[t] - mx);
            const float pj = __expf(sc - mx);
            l_run[t] = l_run[t] * corr + warp_sum(pj);
            m_run[t] = mx;
#pragma unroll
            for (int x = 0; x < G_MAX_DV_PER_LANE; ++x) o[t][x] *= corr;
            for (int jj = 0; jj < G_BLOCK_N; ++jj) {
                const float pb = __shfl_sync(0xffffffff, pj, jj);
#pragma unroll
                for (int x = 0; x < G_MAX_DV_PER_LANE; ++x)
                    if (lane + 32 * x < dv) o[t][x] += pb * sv[jj * dv + lane + 32 * x];
            }
        }
    }

    elem_t* out = (elem_t*)p.out;
#pragma unroll
    for (int t = 0; t < G_ROWS_PER_WARP; ++t) {
        const int i = m0 + warp * G_ROWS_PER_WARP + t;
        if (i >= s.q_len) continue;
        const float inv = l_run[t] > 0.f ? 1.f / l_run[t] : 0.f;
        const uint64_t row = ((uint64_t)(s.q_start + i) * p.heads_q + h) * dv;
#pragma unroll
        for (int x = 0; x < G_MAX_DV_PER_LANE; ++x)
            if (lane + 32 * x < dv) store_elem(out, row + lane + 32 * x, o[t][x] * inv);
        if (p.lse && lane == 0)
            p.lse[lse_index(p, b, h, s.q_start, i)] = l_run[t] > 0.f ? m_run[t] + __logf(l_run[t]) : NEG_INF;
    }
}
