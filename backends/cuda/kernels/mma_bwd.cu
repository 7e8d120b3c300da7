// FlashAttention backward with mma.sync, after FlashAttention-2 (arXiv 2307.08691, Algorithm 2),
// for sm_80 and later. Two kernels:
//   fa_mma_bwd: one CTA per (batch, kv head, block of BLOCK_N keys). K and V stay in shared
//     memory, dK and dV in registers; the CTA walks the query blocks that see its keys
//     (mask_row_blocks), for every query head of its kv head (GQA sums there, in a fixed order).
//     Per query block of BLOCK_M rows, with Q and dO copied by cp.async (Q_STAGES buffers):
//       S^T = K Q^T and dP^T = V dO^T (warps own 16-key rows: K and V are A operands),
//       P = exp2(S - lse), dS = P (dP - delta) softcap',
//       dV += P^T dO and dK += dS^T Q (P^T and dS^T reuse the accumulators as A fragments when
//       one warp owns a 16-key tile; with SPLIT = 2 warps per tile they go through shared
//       memory and each warp owns half of dK's and dV's columns: head dims above 128),
//       dQ += dS K with f32 atomicAdd into dq_accum (dS^T through shared memory), unless
//       dq_accum is null (deterministic: fa_mma_bwd_dq computes dQ instead).
//   fa_mma_bwd_dq: one CTA per (batch, query head, block of 16 NUM_WARPS rows), the forward's
//     shape: S = Q K^T and dP = dO V^T again, then dQ += dS K in registers over the key blocks in
//     order, stored once: bitwise reproducible, at 7 block products instead of 5.
// Compile-time (src/variants.rs from src/backward/tiles.rs MmaBwdTiles): FA_DTYPE (1 f16, 2
// bf16), HEAD_DIM (bucket), BLOCK_M, BLOCK_N, NUM_WARPS, Q_STAGES, DQ_BLOCK_N.
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, ptx.cuh, mma_tile.cuh, bwd.cuh.

#if !defined(HEAD_DIM) || !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(NUM_WARPS) || !defined(Q_STAGES) || \
    !defined(DQ_BLOCK_N)
#error "the mma backward's tile constants come from src/variants.rs"
#endif
#define THREADS (NUM_WARPS * 32)
#define SPLIT (NUM_WARPS * 16 / BLOCK_N)  // warps per 16-key tile
#define Q_COLS (BLOCK_M / SPLIT)          // queries of S^T per warp
#define QN (Q_COLS / 8)                   // 8-query accumulator tiles per warp
#define KV_COLS (HEAD_DIM / SPLIT)        // dK / dV columns per warp
#define KV_N (KV_COLS / 8)
#define RB (HEAD_DIM * 2)                 // bytes of a Q, K, V, dO row in shared memory
#define ST_RB (BLOCK_M * 2)               // bytes of a P^T / dS^T row ([key][query])
// dQ = dS K: DQ_WM warps over the 16-row tiles times DQ_WN over the columns, DQ_PASS at a time.
#define DQ_WM (NUM_WARPS < BLOCK_M / 16 ? NUM_WARPS : BLOCK_M / 16)
#define DQ_WN (NUM_WARPS / DQ_WM)
#define DQ_COLS (HEAD_DIM / DQ_WN)
#define DQ_PASS (DQ_COLS < 64 ? DQ_COLS : 64)
#if SPLIT * BLOCK_N != NUM_WARPS * 16 || (SPLIT != 1 && SPLIT != 2) || QN % 2 || KV_COLS % 16 || \
    (BLOCK_M / 16) % DQ_WM || NUM_WARPS % DQ_WM || DQ_COLS % 16 || (Q_STAGES != 1 && Q_STAGES != 2)
#error "mma backward tiles: 16 keys per warp or warp pair, 16-query steps, 16-column dQ groups, 1 or 2 stages"
#endif

// Shared memory, bytes: K, V, Q_STAGES x (Q, dO), dS^T (and P^T with SPLIT 2), then the
// statistics lse2[Q_STAGES][BLOCK_M], delta[Q_STAGES][BLOCK_M] (f32).
#define K_T 0
#define V_T (BLOCK_N * RB)
#define Q_T(s) (2 * BLOCK_N * RB + (s) * BLOCK_M * RB)
#define DO_T(s) (2 * BLOCK_N * RB + (Q_STAGES + (s)) * BLOCK_M * RB)
#define DS_T (2 * BLOCK_N * RB + 2 * Q_STAGES * BLOCK_M * RB)
#define PT_T (DS_T + BLOCK_N * ST_RB)
#define STATS (DS_T + SPLIT * BLOCK_N * ST_RB)

// One key block's loop state: where the inputs are and what this thread's keys see.
struct KeyBlock {
    const Params& p;
    SeqBounds s;
    int b, kv_h, j0;
    int n_m, m_lo;      // query blocks [m_lo, m_lo + n_m) of every query head
    int key[2];         // this thread's keys: rows g and g + 8 of its warp's 16-key tile
    int rlo[2], rhi[2]; // the query rows that see them
    int full_lo, full_hi;  // rows that see every key of the block
    bool vec;           // 16-byte copies (head dims and strides multiples of 8)
    DEV int head(int it) const { return kv_h * p.group + it / n_m; }
    DEV int m0(int it) const { return (m_lo + it % n_m) * BLOCK_M; }
};

// Whether q, k, v and dout all go by 16-byte copies (head dims and strides multiples of 8).
DEV bool bwd_vec(const Params& p) {
    return ((p.head_dim | p.head_dim_v | stride_bits(p.q_strides) | stride_bits(p.k_strides) |
             stride_bits(p.v_strides) | stride_bits(p.do_strides)) & 7) == 0;
}

// Queues the copies of item it's Q and dO rows into buffer `stage` (one cp.async group).
DEV void load_q_do(const KeyBlock& kb, const elem_t* dout, uint8_t* smem, uint32_t base, int it, int stage) {
    const Params& p = kb.p;
    const int h = kb.head(it), m0 = kb.m0(it), rows = kb.s.q_len - m0;
    const elem_t* q = (const elem_t*)p.q + strided_row(p, p.q_strides, kb.b, kb.s.q_start, m0, h);
    const elem_t* dO = dout + strided_row(p, p.do_strides, kb.b, kb.s.q_start, m0, h);
    load_rows<BLOCK_M, HEAD_DIM, THREADS>(smem, base, Q_T(stage), q, p.q_strides[1], rows, p.head_dim, kb.vec);
    load_rows<BLOCK_M, HEAD_DIM, THREADS>(smem, base, DO_T(stage), dO, p.do_strides[1], rows, p.head_dim_v, kb.vec);
    cp_async_commit();
}

// Thread x < BLOCK_M reads row m0 + x's LSE (log2 units) and delta of item it (+inf and 0 past
// the sequence: no gradient).
DEV void load_stats(const KeyBlock& kb, const float* delta, int it, float& lse2, float& dl) {
    const int i = kb.m0(it) + threadIdx.x;
    lse2 = POS_INF;
    dl = 0.f;
    if (threadIdx.x < BLOCK_M && i < kb.s.q_len) {
        const uint64_t at = lse_index(kb.p, kb.b, kb.head(it), kb.s.q_start, i);
        lse2 = lse_log2(kb.p.lse[at]);
        dl = delta[at];
    }
}

DEV void store_stats(float* stats, int stage, float lse2, float dl) {
    if (threadIdx.x < BLOCK_M) {
        stats[stage * BLOCK_M + threadIdx.x] = lse2;
        stats[(Q_STAGES + stage) * BLOCK_M + threadIdx.x] = dl;
    }
}

// P^T and dS^T of this warp's 16 keys x Q_COLS queries from S^T and dP^T, in place; masked
// scores (and rows past the sequence) get exactly 0, whatever the other inputs hold.
DEV void grads_block(const KeyBlock& kb, const GradCtx& c, const float* stats, int stage, int m0, int q_col0, int lane,
                     float (&st)[QN][4], float (&dpt)[QN][4]) {
    const bool need_mask = kb.j0 + BLOCK_N > kb.s.k_len || m0 < kb.full_lo || m0 + BLOCK_M > kb.full_hi;
#pragma unroll
    for (int nt = 0; nt < QN; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = q_col0 + nt * 8 + 2 * (lane % 4) + (e & 1), i = m0 + col, r = e >> 1;
            float pr = 0.f, ds = 0.f;
            if (!need_mask || (i >= kb.rlo[r] && i < kb.rhi[r]))
                grad_of_score(c, st[nt][e], dpt[nt][e], i, kb.key[r], stats[stage * BLOCK_M + col],
                              stats[(Q_STAGES + stage) * BLOCK_M + col], pr, ds);
            st[nt][e] = pr;
            dpt[nt][e] = ds;
        }
}

// Writes this warp's 16 x Q_COLS accumulators as 16-bit rows of a [key][query] tile.
DEV void store_kq(uint8_t* smem, uint32_t tile, const float (&x)[QN][4], int key0, int q_col0, int lane) {
#pragma unroll
    for (int nt = 0; nt < QN; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int col = q_col0 + nt * 8 + 2 * (lane % 4);
            *(uint32_t*)(smem + tile + swz<ST_RB>(key0 + lane / 4 + 8 * r, col / 8) + (col % 8) * 2) =
                PACK2(x[nt][2 * r], x[nt][2 * r + 1]);
        }
}

// dQ += dS K for item it's query block (dS^T in shared memory), added into dq_accum with f32
// atomics: warp w takes 16-row tiles w % DQ_WM (+ DQ_WM ...) and columns DQ_COLS (w / DQ_WM) on.
DEV void dq_atomic(const KeyBlock& kb, uint32_t base, float* dq_accum, int h, int m0, int warp, int lane) {
    const Params& p = kb.p;
    const int d = p.head_dim;
#pragma unroll
    for (int rt = warp % DQ_WM; rt < BLOCK_M / 16; rt += DQ_WM)
#pragma unroll
        for (int pass = 0; pass < DQ_COLS / DQ_PASS; ++pass) {
            const int col0 = (warp / DQ_WM) * DQ_COLS + pass * DQ_PASS;
            if (col0 >= d) break;
            float acc[DQ_PASS / 8][4] = {};
            mma_ab_smem<BLOCK_N / 16, DQ_PASS / 8, ST_RB, RB, true>(acc, base + DS_T, rt * 16, base + K_T, col0, lane,
                                                                    (d - col0 + 15) / 16);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = m0 + rt * 16 + lane / 4 + 8 * (e >> 1);
                if (i >= kb.s.q_len) continue;
                float* row = dq_accum + ((uint64_t)(kb.s.q_start + i) * p.heads_q + h) * d;
#pragma unroll
                for (int nt = 0; nt < DQ_PASS / 8; ++nt) {
                    const int col = col0 + nt * 8 + 2 * (lane % 4) + (e & 1);
                    if (col < d) atomicAdd(row + col, acc[nt][e]);
                }
            }
        }
}

// grid: (key blocks of the longest sequence, heads_kv, batch); block: THREADS; dynamic shared
// memory: STATS + 8 Q_STAGES BLOCK_M bytes (MmaBwdTiles::smem_bytes).
extern "C" __global__ void __launch_bounds__(THREADS)
    fa_mma_bwd(const __grid_constant__ Params p, const elem_t* dout, const float* delta, float* dq_accum, elem_t* dk,
               elem_t* dv) {
    extern __shared__ __align__(128) uint8_t smem[];
    const uint32_t base = smem_addr(smem);
    float* stats = (float*)(smem + STATS);
    const int b = blockIdx.z, kv_h = blockIdx.y, j0 = blockIdx.x * BLOCK_N;
    KeyBlock kb{p, seq_bounds(p, b), b, kv_h, j0};
    const SeqBounds& s = kb.s;
    if (j0 >= s.k_len) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, kt = warp / SPLIT, qp = warp % SPLIT;
    const int d = p.head_dim, dvd = p.head_dim_v, j_end = min(j0 + BLOCK_N, s.k_len);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        kb.key[r] = j0 + kt * 16 + lane / 4 + 8 * r;
        mask_rows(p, kb.key[r], s.q_len, s.k_len, kb.rlo[r], kb.rhi[r]);
    }
    int tmp;
    mask_rows(p, j_end - 1, s.q_len, s.k_len, kb.full_lo, tmp);
    mask_rows(p, j0, s.q_len, s.k_len, tmp, kb.full_hi);
    int m_hi;
    mask_row_blocks(p, j0, j_end, s.q_len, s.k_len, BLOCK_M, kb.m_lo, m_hi);
    kb.n_m = m_hi - kb.m_lo;
    kb.vec = bwd_vec(p);

    float dk_acc[KV_N][4] = {}, dv_acc[KV_N][4] = {};
    const int total = kb.n_m * p.group;  // items: (query head, query block), head-major
    const int k_steps = (d + 15) / 16, v_steps = (dvd + 15) / 16;
    // This warp's dK / dV columns and how many 16-column pairs of them are real.
    const int kv_col0 = qp * KV_COLS, k_pairs = (d - kv_col0 + 15) / 16, v_pairs = (dvd - kv_col0 + 15) / 16;
    if (total > 0) {
        const elem_t* k = (const elem_t*)p.k + strided_row(p, p.k_strides, b, s.k_start, j0, kv_h);
        const elem_t* v = (const elem_t*)p.v + strided_row(p, p.v_strides, b, s.k_start, j0, kv_h);
        load_rows<BLOCK_N, HEAD_DIM, THREADS>(smem, base, K_T, k, p.k_strides[1], s.k_len - j0, d, kb.vec);
        load_rows<BLOCK_N, HEAD_DIM, THREADS>(smem, base, V_T, v, p.v_strides[1], s.k_len - j0, dvd, kb.vec);
        load_q_do(kb, dout, smem, base, 0, 0);
        float nl, nd;
        load_stats(kb, delta, 0, nl, nd);
        store_stats(stats, 0, nl, nd);
    }
    for (int it = 0; it < total; ++it) {
        const int stage = Q_STAGES == 2 ? it & 1 : 0, h = kb.head(it), m0 = kb.m0(it);
        const bool next = it + 1 < total;
        cp_async_wait<0>();
        __syncthreads();  // item it's Q, dO, statistics are in; every warp is done with item it - 1
        float nl, nd;
        if (Q_STAGES == 2 && next) {
            load_q_do(kb, dout, smem, base, it + 1, stage ^ 1);
            load_stats(kb, delta, it + 1, nl, nd);
        }
        float st[1][QN][4] = {}, dpt[1][QN][4] = {};
        mma_abt<1, QN, RB>(dpt, base + V_T, kt * 16, base + DO_T(stage), qp * Q_COLS, lane, v_steps);
        mma_abt<1, QN, RB>(st, base + K_T, kt * 16, base + Q_T(stage), qp * Q_COLS, lane, k_steps);
        grads_block(kb, grad_ctx(p, s, b, h), stats, stage, m0, qp * Q_COLS, lane, st[0], dpt[0]);
#if SPLIT == 1
        uint32_t pa[QN / 2][4], da[QN / 2][4];
        pack_a<QN / 2>(pa, st[0]);
        pack_a<QN / 2>(da, dpt[0]);
        mma_ab_regs<QN / 2, KV_N, RB>(dv_acc, pa, base + DO_T(stage), 0, 0, lane, v_pairs);
        mma_ab_regs<QN / 2, KV_N, RB>(dk_acc, da, base + Q_T(stage), 0, 0, lane, k_pairs);
        if (dq_accum) store_kq(smem, DS_T, dpt[0], kt * 16, 0, lane);
        if (dq_accum || Q_STAGES == 1) __syncthreads();  // dS^T is in; every warp is done with Q, dO
#else
        store_kq(smem, PT_T, st[0], kt * 16, qp * Q_COLS, lane);
        store_kq(smem, DS_T, dpt[0], kt * 16, qp * Q_COLS, lane);
        __syncthreads();  // P^T and dS^T are in
        mma_ab_smem<BLOCK_M / 16, KV_N, ST_RB, RB, false>(dv_acc, base + PT_T, kt * 16, base + DO_T(stage), kv_col0, lane,
                                                         v_pairs);
        mma_ab_smem<BLOCK_M / 16, KV_N, ST_RB, RB, false>(dk_acc, base + DS_T, kt * 16, base + Q_T(stage), kv_col0, lane,
                                                         k_pairs);
        if (Q_STAGES == 1) __syncthreads();  // every warp is done with Q and dO
#endif
        if (Q_STAGES == 1 && next) {
            load_q_do(kb, dout, smem, base, it + 1, 0);
            load_stats(kb, delta, it + 1, nl, nd);
        }
        if (dq_accum) dq_atomic(kb, base, dq_accum, h, m0, warp, lane);
        if (next) store_stats(stats, Q_STAGES == 2 ? stage ^ 1 : 0, nl, nd);
    }
    const uint64_t hkv = p.heads_kv;
    store_acc<KV_N>(dk_acc, [&](int j) { return dk + ((s.k_start + j) * hkv + kv_h) * d; }, j0 + kt * 16, kv_col0,
                    s.k_len, d, p.scale, lane);
    store_acc<KV_N>(dv_acc, [&](int j) { return dv + ((s.k_start + j) * hkv + kv_h) * dvd; }, j0 + kt * 16, kv_col0,
                    s.k_len, dvd, 1.f, lane);
}

// ---- deterministic dQ ---------------------------------------------------------------------

#define DQ_BM (NUM_WARPS * 16)  // query rows per CTA: one 16-row tile per warp
#define DQN (DQ_BLOCK_N / 8)
#define DQ_Q 0
#define DQ_DO (DQ_BM * RB)
#define DQ_K (2 * DQ_BM * RB)
#define DQ_V (DQ_K + DQ_BLOCK_N * RB)
#if DQ_BLOCK_N % 16
#error "dq kernel: 16-key steps"
#endif

// grid: (query blocks of DQ_BM rows, heads_q, batch); block: THREADS; dynamic shared memory:
// (2 DQ_BM + 2 DQ_BLOCK_N) RB bytes.
extern "C" __global__ void __launch_bounds__(THREADS)
    fa_mma_bwd_dq(const __grid_constant__ Params p, const elem_t* dout, const float* delta, elem_t* dq) {
    extern __shared__ __align__(128) uint8_t smem[];
    const uint32_t base = smem_addr(smem);
    const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * DQ_BM;
    const SeqBounds s = seq_bounds(p, b);
    if (m0 >= s.q_len) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, kv_h = h / p.group;
    const int d = p.head_dim, dvd = p.head_dim_v, m_end = min(m0 + DQ_BM, s.q_len);
    const GradCtx c = grad_ctx(p, s, b, h);
    int row[2], lo[2], hi[2];
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row[r] = m0 + warp * 16 + lane / 4 + 8 * r;
        lo[r] = hi[r] = 0;
        lse2[r] = POS_INF;
        dl[r] = 0.f;
        if (row[r] < s.q_len) {
            mask_keys(p, row[r], s.q_len, s.k_len, lo[r], hi[r]);
            const uint64_t at = lse_index(p, b, h, s.q_start, row[r]);
            lse2[r] = lse_log2(p.lse[at]);
            dl[r] = delta[at];
        }
    }
    int full_lo, full_hi, tmp, n_lo, n_hi;
    mask_keys(p, m_end - 1, s.q_len, s.k_len, full_lo, tmp);
    mask_keys(p, m0, s.q_len, s.k_len, tmp, full_hi);
    mask_key_blocks(p, m0, m_end, s.q_len, s.k_len, DQ_BLOCK_N, n_lo, n_hi);
    const bool vec = bwd_vec(p);
    const int k_steps = (d + 15) / 16, v_steps = (dvd + 15) / 16, d_pairs = (d + 15) / 16;
    const uint64_t k_stride = p.k_strides[1], v_stride = p.v_strides[1];
    const elem_t* k = (const elem_t*)p.k + strided_row(p, p.k_strides, b, s.k_start, 0, kv_h);
    const elem_t* v = (const elem_t*)p.v + strided_row(p, p.v_strides, b, s.k_start, 0, kv_h);
    float acc[HEAD_DIM / 8][4] = {};
    if (n_lo < n_hi) {
        const elem_t* q = (const elem_t*)p.q + strided_row(p, p.q_strides, b, s.q_start, m0, h);
        const elem_t* dO = dout + strided_row(p, p.do_strides, b, s.q_start, m0, h);
        load_rows<DQ_BM, HEAD_DIM, THREADS>(smem, base, DQ_Q, q, p.q_strides[1], s.q_len - m0, d, vec);
        load_rows<DQ_BM, HEAD_DIM, THREADS>(smem, base, DQ_DO, dO, p.do_strides[1], s.q_len - m0, dvd, vec);
    }
    for (int n = n_lo; n < n_hi; ++n) {
        const int j0 = n * DQ_BLOCK_N;
        if (n > n_lo) __syncthreads();  // every warp is done with the previous K and V
        load_rows<DQ_BLOCK_N, HEAD_DIM, THREADS>(smem, base, DQ_K, k + j0 * k_stride, k_stride, s.k_len - j0, d, vec);
        load_rows<DQ_BLOCK_N, HEAD_DIM, THREADS>(smem, base, DQ_V, v + j0 * v_stride, v_stride, s.k_len - j0, dvd, vec);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        float sc[1][DQN][4] = {}, dp[1][DQN][4] = {};
        mma_abt<1, DQN, RB>(sc, base + DQ_Q, warp * 16, base + DQ_K, 0, lane, k_steps);
        mma_abt<1, DQN, RB>(dp, base + DQ_DO, warp * 16, base + DQ_V, 0, lane, v_steps);
        const bool need_mask = j0 < full_lo || j0 + DQ_BLOCK_N > full_hi || j0 + DQ_BLOCK_N > s.k_len;
#pragma unroll
        for (int nt = 0; nt < DQN; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + nt * 8 + 2 * (lane % 4) + (e & 1), r = e >> 1;
                float pr = 0.f, ds = 0.f;
                if (!need_mask || (j >= lo[r] && j < hi[r]))
                    grad_of_score(c, sc[0][nt][e], dp[0][nt][e], row[r], j, lse2[r], dl[r], pr, ds);
                dp[0][nt][e] = ds;
            }
        uint32_t da[DQN / 2][4];
        pack_a<DQN / 2>(da, dp[0]);
        mma_ab_regs<DQN / 2, HEAD_DIM / 8, RB>(acc, da, base + DQ_K, 0, 0, lane, d_pairs);
    }
    const uint64_t hq = p.heads_q;
    store_acc<HEAD_DIM / 8>(acc, [&](int i) { return dq + ((s.q_start + i) * hq + h) * d; }, m0 + warp * 16, 0, s.q_len,
                            d, p.scale, lane);
}
