// Portable FlashAttention forward for any NVIDIA GPU (sm_70+) and any shape the spec allows:
// every head_dim / head_dim_v up to 256, f32 / f16 / bf16, all masks and score mods, varlen.
// Used on non-Hopper GPUs and for shapes the Hopper kernel does not cover. Plain CUDA cores:
// correct and simple rather than fast.
//
// A block of 4 warps owns 16 query rows (4 per warp). Key/value blocks of 32 rows are staged
// in shared memory as f32. For each of its rows a warp computes 32 scores at once (lane j
// takes key j), folds them into the online softmax with warp reductions, then accumulates
// P V with each lane owning the output dimensions lane, lane + 32, ...
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, warp.cuh.
// Compile-time (src/variants.rs, from src/tiles.rs GenericTiles): FA_DTYPE, ROWS_PER_WARP,
// NUM_WARPS, BLOCK_M (= ROWS_PER_WARP * NUM_WARPS), BLOCK_N (32: one key per lane), MAX_HEAD_DIM.

#if !defined(ROWS_PER_WARP) || !defined(NUM_WARPS) || !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(MAX_HEAD_DIM)
#error "the generic kernel's tile constants come from src/variants.rs"
#endif
#if BLOCK_N != 32 || BLOCK_M != ROWS_PER_WARP * NUM_WARPS
#error "the generic kernel takes one key per lane and ROWS_PER_WARP rows per warp"
#endif
#define MAX_DV_PER_LANE (MAX_HEAD_DIM / 32)

// grid: (num_m_blocks, heads_q, batch); dynamic shared memory: see generic_smem_bytes in Rust.
extern "C" __global__ void __launch_bounds__(NUM_WARPS * 32) fa_generic_fwd(const Params p) {
    extern __shared__ float smem[];
    const int d = p.head_dim, dv = p.head_dim_v;
    float* sq = smem;                          // [BLOCK_M][d]
    float* sk = sq + BLOCK_M * d;            // [BLOCK_N][d + 1]  (+1: no bank conflicts)
    float* sv = sk + BLOCK_N * (d + 1);      // [BLOCK_N][dv]

    const int b = blockIdx.z, h = blockIdx.y;
    const SeqBounds s = seq_bounds(p, b);
    const int m0 = blockIdx.x * BLOCK_M;
    if (m0 >= s.q_len) return;
    const int m1 = min(m0 + BLOCK_M, s.q_len);
    const int kv_h = h / p.group;
    // Row 0 of this sequence and head; rows are the token stride apart.
    const elem_t* q = (const elem_t*)p.q + strided_row(p, p.q_strides, b, s.q_start, 0, h);
    const elem_t* k = (const elem_t*)p.k + strided_row(p, p.k_strides, b, s.k_start, 0, kv_h);
    const elem_t* v = (const elem_t*)p.v + strided_row(p, p.v_strides, b, s.k_start, 0, kv_h);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float slope = alibi_slope(p, b, h);

    for (int x = threadIdx.x; x < BLOCK_M * d; x += blockDim.x) {
        int r = x / d, c = x % d;
        sq[x] = m0 + r < s.q_len ? load_elem(q, (uint64_t)(m0 + r) * p.q_strides[1] + c) : 0.f;
    }

    float o[ROWS_PER_WARP][MAX_DV_PER_LANE];
    float m_run[ROWS_PER_WARP], l_run[ROWS_PER_WARP];
    int lo[ROWS_PER_WARP], hi[ROWS_PER_WARP];
    online_softmax_init(o, m_run, l_run);
#pragma unroll
    for (int t = 0; t < ROWS_PER_WARP; ++t) {
        mask_keys(p, m0 + warp * ROWS_PER_WARP + t, s.q_len, s.k_len, lo[t], hi[t]);
    }

    int n_lo, n_hi;
    mask_key_blocks(p, m0, m1, s.q_len, s.k_len, BLOCK_N, n_lo, n_hi);
    for (int n = n_lo; n < n_hi; ++n) {
        const int j0 = n * BLOCK_N;
        __syncthreads();  // previous block fully consumed (and sq written, first time)
        for (int x = threadIdx.x; x < BLOCK_N * d; x += blockDim.x) {
            int r = x / d, c = x % d;
            sk[r * (d + 1) + c] =
                j0 + r < s.k_len ? load_elem(k, (uint64_t)(j0 + r) * p.k_strides[1] + c) : 0.f;
        }
        for (int x = threadIdx.x; x < BLOCK_N * dv; x += blockDim.x) {
            int r = x / dv, c = x % dv;
            sv[x] = j0 + r < s.k_len ? load_elem(v, (uint64_t)(j0 + r) * p.v_strides[1] + c) : 0.f;
        }
        __syncthreads();

#pragma unroll
        for (int t = 0; t < ROWS_PER_WARP; ++t) {
            const int r = warp * ROWS_PER_WARP + t;
            const int i = m0 + r;
            if (i >= s.q_len) continue;  // uniform across the warp
            const int j = j0 + lane;
            float sc = NEG_INF;
            if (j < s.k_len && j >= lo[t] && j < hi[t]) {
                float dot = 0.f;
                for (int c = 0; c < d; ++c) dot += sq[r * d + c] * sk[lane * (d + 1) + c];
                sc = score_mod(p, dot, slope, i, j, s.q_len, s.k_len);
            }
            float pj, corr;
            if (!online_softmax_step(sc, m_run[t], l_run[t], pj, corr)) continue;
#pragma unroll
            for (int x = 0; x < MAX_DV_PER_LANE; ++x) o[t][x] *= corr;
            for (int jj = 0; jj < BLOCK_N; ++jj) {
                const float pb = __shfl_sync(0xffffffff, pj, jj);
                if (pb == 0.f) continue;  // masked key: its v (even NaN) must not count
#pragma unroll
                for (int x = 0; x < MAX_DV_PER_LANE; ++x)
                    if (lane + 32 * x < dv) o[t][x] += pb * sv[jj * dv + lane + 32 * x];
            }
        }
    }

    elem_t* out = (elem_t*)p.out;
#pragma unroll
    for (int t = 0; t < ROWS_PER_WARP; ++t) {
        const int i = m0 + warp * ROWS_PER_WARP + t;
        if (i >= s.q_len) continue;
        const float inv = l_run[t] != 0.f ? 1.f / l_run[t] : 0.f;  // NaN stays NaN
        const uint64_t row = ((uint64_t)(s.q_start + i) * p.heads_q + h) * dv;
#pragma unroll
        for (int x = 0; x < MAX_DV_PER_LANE; ++x)
            if (lane + 32 * x < dv) store_elem(out, row + lane + 32 * x, o[t][x] * inv);
        if (p.lse && lane == 0)
            p.lse[lse_index(p, b, h, s.q_start, i)] = l_run[t] != 0.f ? m_run[t] + __logf(l_run[t]) : NEG_INF;
    }
}
