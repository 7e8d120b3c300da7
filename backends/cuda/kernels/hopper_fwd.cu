// FlashAttention forward for Hopper (sm_90a), after FlashAttention-3:
//   * one producer warpgroup issues TMA loads (tensor maps encoded on the host) of Q and of
//     K/V blocks into a STAGES-deep shared-memory ring guarded by mbarriers;
//   * two consumer warpgroups each own 64 query rows of the 128-row tile and run
//     S = Q K^T with wgmma from shared memory (SS), the online softmax in registers, and
//     O += P V with P from registers (RS);
//   * pingpong: named barriers make the two consumer warpgroups take turns issuing GEMMs, and
//     inside a warpgroup the next S = Q K^T is issued before this block's softmax, which
//     then overlaps P V (intra-warpgroup overlap);
//   * setmaxnreg moves registers from the producer to the consumers;
//   * a persistent grid walks the tiles, heaviest (last query blocks, for causal) first;
//   * key blocks hidden by the causal/window mask are skipped; partially visible ones masked.
// Compile-time parameters (src/variants.rs, from src/tiles.rs and src/tensor_map.rs): FA_DTYPE
// (1 f16, 2 bf16, 3 FP8 e4m3), HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, SCORE_MOD (softcap or ALiBi present),
// NUM_THREADS, COL_BLOCK (elements per 128-byte swizzled row = the TMA box width).
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, tiles.cuh, ptx.cuh,
// ptx_hopper.cuh, wgmma.cuh (and fp8_vt.cu for FP8).
// FP8 e4m3 (FA_DTYPE 3, the `#if FA_DTYPE == 3` parts): 1-byte Q, K and a transposed V (Vt, from
// fp8_vt.cu, loaded like K), wgmma k32; q and k descales fold into the softmax scale, v's into
// the final normalisation; P goes to e4m3 in registers in the key order Vt is stored in; the
// output is bf16. The bf16/f16 kernels compile from the same text without those parts.
//
// The code is split into producer_loop / consumer_tile / epilogue; that split was mechanical
// (same statements in the same order as the kernel measured and tested on an H100 in
// PERF_NOTES.md, run 7).

#if !defined(HEAD_DIM) || !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(STAGES) || !defined(NUM_THREADS) || \
    !defined(COL_BLOCK) || !defined(SCORE_MOD)
#error "the Hopper kernel's tile constants come from src/variants.rs"
#endif
#if FA_DTYPE == 3
#define ELEM_BYTES 1
#define P_LOG2_SCALE 8.f  // P is stored as 256 p: e4m3 keeps its 3 mantissa bits down to p = 2^-14
#define FP8_PARAM , const Fp8Args &f
#define FP8_ARG , f
#else
#define ELEM_BYTES 2
#define FP8_PARAM
#define FP8_ARG
#endif
#define Q_BYTES (BLOCK_M * HEAD_DIM * ELEM_BYTES)
#define KV_BYTES (BLOCK_N * HEAD_DIM * ELEM_BYTES)  // one K (or V / Vt) stage
// wgmma k-steps (32 bytes of each row) of Q K^T and of P V.
#if FA_DTYPE == 3
#define K_STEPS (HEAD_DIM / 32)
#define PA_STEPS (BLOCK_N / 32)
#else
#define K_STEPS (HEAD_DIM / 16)
#define PA_STEPS (BLOCK_N / 16)
#endif
#define PRODUCER_REGS 24                      // 24 x 128 + 240 x 256 = the 168 x 384 at launch
#define CONSUMER_REGS 240

// Schedule choices, fixed here after measuring both ways on an H100 (PERF_NOTES.md); the
// tuning hook FLASHATTN_CUDA_EXTRA_DEFINES can flip them for an A/B run.
// FP8 head_dim 256 (not measured yet): O (128 registers), S (64) and P (16) with the softmax's
// state overflow the 240 registers (ptxas spilled 4 bytes per tile), so P V finishes before
// the softmax (P dead then; pingpong still hides the softmax). A/B on a GPU:
// -DSOFTMAX_UNDER_PV=1. With score mods it spills either way (12-23 bytes): not built.
#if FA_DTYPE == 3 && HEAD_DIM == 256
#define FP8_D256 1
#else
#define FP8_D256 0
#endif
#ifndef RESCALE_UNDER_QK
#define RESCALE_UNDER_QK 1   // rescale O while S = Q K^T runs (1) or before taking the turn (0)
#endif
#ifndef EARLY_Q_RELEASE
#define EARLY_Q_RELEASE 1    // free Q after the tile's last Q K^T (1) or after its last P V (0)
#endif
#ifndef SOFTMAX_UNDER_PV
#if FP8_D256
#define SOFTMAX_UNDER_PV 0
#else
#define SOFTMAX_UNDER_PV 1   // the softmax of S_{n+1} runs while P_n V_n is on the tensor cores
#endif
#endif

#if FA_DTYPE == 3
#define WG_TYPE e4m3
#define PACK2 pack_bf16x2  // the output
#elif FA_DTYPE == 2
#define WG_TYPE bf16
#define PACK2 pack_bf16x2
#else
#define WG_TYPE f16
#define PACK2 pack_f16x2
#endif
#define WG_CAT(a, b, c, d) a##b##c##d
#define WG_NAME(kind, t, n) WG_CAT(wgmma_, kind, _##t##_n, n)
#define WGMMA_SS(t, n) WG_NAME(ss, t, n)
#define WGMMA_RS(t, n) WG_NAME(rs, t, n)

// ---- shared memory: Q, the K/V ring, their mbarriers ------------------------------------

// The K/V ring: STAGES slots each of K and V, each slot with a "full" mbarrier (completed by
// the producer's TMA bytes) and an "empty" one (every consumer thread arrives when done).
// Block `it` of a CTA's walk uses slot it % STAGES in phase (it / STAGES) & 1.
struct KvRing {
    uint32_t k, v;  // first K and first V slot
    uint32_t bars;  // k_full[STAGES], k_empty[STAGES], v_full[STAGES], v_empty[STAGES]
    DEV uint32_t k_slot(uint32_t st) const { return k + st * KV_BYTES; }
    DEV uint32_t v_slot(uint32_t st) const { return v + st * KV_BYTES; }
    DEV uint32_t k_full(uint32_t st) const { return bars + 8 * st; }
    DEV uint32_t k_empty(uint32_t st) const { return bars + 8 * (STAGES + st); }
    DEV uint32_t v_full(uint32_t st) const { return bars + 8 * (2 * STAGES + st); }
    DEV uint32_t v_empty(uint32_t st) const { return bars + 8 * (3 * STAGES + st); }
};

// Shared-memory addresses of one CTA (layout: src/tiles.rs HopperTiles::smem_bytes).
struct Smem {
    uint32_t q, q_full, q_empty;
    KvRing kv;
};

// Key blocks this tile visits; empty when the sequence has no rows here or all are masked.
DEV void tile_blocks(const Params& p, const Tile& t, const SeqBounds& s, int& n_lo, int& n_hi) {
    int m0 = t.m_block * BLOCK_M;
    if (m0 >= s.q_len || s.k_len == 0) {
        n_lo = n_hi = 0;
        return;
    }
    int m1 = min(m0 + BLOCK_M, s.q_len);
    mask_key_blocks(p, m0, m1, s.q_len, s.k_len, BLOCK_N, n_lo, n_hi);
}

// Tile t of the persistent grid: which (batch, head, query block), its sequence's bounds and
// the key blocks it visits (tile_blocks); the producer and the consumers walk the same tiles.
struct TileWork {
    Tile tile;
    SeqBounds s;
    int n_lo, n_hi;
};

DEV TileWork tile_work(const Params& p, int t) {
    TileWork w;
    w.tile = decode_tile(p, t);
    w.s = seq_bounds(p, w.tile.b);
    tile_blocks(p, w.tile, w.s, w.n_lo, w.n_hi);
    return w;
}

// ---- producer warpgroup -----------------------------------------------------------------

// One thread walks this CTA's tiles and loads Q once per tile and every visible K/V block
// into the ring, waiting for a slot to be emptied before reusing it.
DEV void producer_loop(const Params& p, const TensorMap& tm_q, const TensorMap& tm_k, const TensorMap& tm_v,
                       const Smem& sm FP8_PARAM) {
    tma_prefetch_map(&tm_q);
    tma_prefetch_map(&tm_k);
    tma_prefetch_map(&tm_v);
    const KvRing& ring = sm.kv;
    uint32_t it = 0, q_count = 0;
    for (int t = blockIdx.x; t < p.total_tiles; t += gridDim.x) {
        const auto [tile, s, n_lo, n_hi] = tile_work(p, t);
        if (n_lo >= n_hi) continue;
        const int kv_h = tile.h / p.group;
        // Q: wait until both consumers are done with the previous tile's Q.
        mbar_wait(sm.q_empty, (q_count & 1) ^ 1);
        mbar_expect_tx(sm.q_full, Q_BYTES);
#pragma unroll 1
        for (int c = 0; c < HEAD_DIM / COL_BLOCK; ++c)
            tma_load(sm.q + c * BLOCK_M * 128, &tm_q, sm.q_full, c * COL_BLOCK, tile.h,
                     s.q_start + tile.m_block * BLOCK_M);
        ++q_count;
        for (int n = n_lo; n < n_hi; ++n, ++it) {
            const uint32_t st = it % STAGES, ph = ((it / STAGES) & 1) ^ 1;
            const int row = s.k_start + n * BLOCK_N;
            mbar_wait(ring.k_empty(st), ph);
            mbar_expect_tx(ring.k_full(st), KV_BYTES);
#pragma unroll 1
            for (int c = 0; c < HEAD_DIM / COL_BLOCK; ++c)
                tma_load(ring.k_slot(st) + c * BLOCK_N * 128, &tm_k, ring.k_full(st), c * COL_BLOCK, kv_h, row);
            mbar_wait(ring.v_empty(st), ph);
            mbar_expect_tx(ring.v_full(st), KV_BYTES);
#if FA_DTYPE == 3
            // Vt: BLOCK_N / 128 boxes of 128 keys x HEAD_DIM rows, laid out like K's column blocks.
            const int vt_col = f.vt_start[tile.b] + n * BLOCK_N;
#pragma unroll 1
            for (int c = 0; c < BLOCK_N / 128; ++c)
                tma_load(ring.v_slot(st) + c * HEAD_DIM * 128, &tm_v, ring.v_full(st), vt_col + c * 128, 0, kv_h);
#else
#pragma unroll 1
            for (int c = 0; c < HEAD_DIM / COL_BLOCK; ++c)
                tma_load(ring.v_slot(st) + c * BLOCK_N * 128, &tm_v, ring.v_full(st), c * COL_BLOCK, kv_h, row);
#endif
        }
    }
}

// ---- consumer pieces --------------------------------------------------------------------

// What the softmax of one key block needs about the current tile and this thread's two rows.
struct BlockCtx {
    const Params& p;
    SeqBounds s;
    int m0, row0, col0;
    float slope, sl2;
    int full_lo, full_hi;  // keys every row of the tile sees
    int lo0, lo1, hi0, hi1;
#if FA_DTYPE == 3
    float qk_descale;  // the score mods see the true q.k
#endif
};

// Pingpong between the two consumer warpgroups (named barriers 1 and 2, 256 threads each):
// a warpgroup issues its GEMMs only after the other has issued its own, so one's softmax
// runs while the other's GEMMs occupy the tensor cores. Barrier ids are immediates.
DEV void pingpong_wait(int wg) {
    if (wg == 0) asm volatile("bar.sync 1, 256;" ::: "memory");
    else asm volatile("bar.sync 2, 256;" ::: "memory");
}
DEV void pingpong_release(int wg) {
    if (wg == 0) asm volatile("bar.arrive 2, 256;" ::: "memory");
    else asm volatile("bar.arrive 1, 256;" ::: "memory");
}

// S = Q K^T for this warpgroup's 64 rows: K_STEPS wgmmas over 32 bytes of each row.
DEV void issue_qk(float (&sc)[BLOCK_N / 2], uint32_t q_wg, uint32_t k_stage) {
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
        uint64_t da = smem_desc(q_wg + (kk / 4) * BLOCK_M * 128 + (kk % 4) * 32, 16, 1024);
        uint64_t db = smem_desc(k_stage + (kk / 4) * BLOCK_N * 128 + (kk % 4) * 32, 16, 1024);
        WGMMA_SS(WG_TYPE, BLOCK_N)(sc, da, db, kk > 0);
    }
}

#if FA_DTYPE == 3
// O += P V: BLOCK_N / 32 wgmmas, P from registers, Vt K-major (like K in issue_qk).
DEV void issue_pv(float (&o)[HEAD_DIM / 2], const uint32_t (&pa)[PA_STEPS][4], uint32_t v_stage) {
#pragma unroll
    for (int kk = 0; kk < PA_STEPS; ++kk) {
        uint64_t db = smem_desc(v_stage + (kk / 4) * HEAD_DIM * 128 + (kk % 4) * 32, 16, 1024);
        WGMMA_RS(WG_TYPE, HEAD_DIM)(o, pa[kk], db, 1);
    }
}
#else
// O += P V: BLOCK_N / 16 wgmmas, P from registers, V N-major from shared memory.
DEV void issue_pv(float (&o)[HEAD_DIM / 2], const uint32_t (&pa)[PA_STEPS][4], uint32_t v_stage) {
#pragma unroll
    for (int kk = 0; kk < PA_STEPS; ++kk) {
        uint64_t db = smem_desc(v_stage + kk * 16 * 128, BLOCK_N * 128, 1024);
        WGMMA_RS(WG_TYPE, HEAD_DIM)(o, pa[kk], db, 1);
    }
}
#endif

// Score mods and mask of the block starting at key j0, then the online softmax update:
// sc becomes P (unnormalised, f32), m and l advance, corr is the factor O must be scaled by.
DEV void softmax_block(const BlockCtx& c, float (&sc)[BLOCK_N / 2], int j0, float (&m_run)[2], float (&l_run)[2],
                       float (&corr)[2]) {
    const bool need_mask = j0 < c.full_lo || j0 + BLOCK_N > c.full_hi || j0 + BLOCK_N > c.s.k_len;
#pragma unroll
    for (int v = 0; v < BLOCK_N / 2; ++v) {
        const int r = (v / 2) % 2;
        const int j = j0 + 8 * (v / 4) + c.col0 + (v % 2);
#if FA_DTYPE == 3
        if (SCORE_MOD) sc[v] *= c.qk_descale;
#endif
        if (SCORE_MOD) sc[v] = score_mod(c.p, sc[v], c.slope, c.m0 + c.row0 + 8 * r, j, c.s.q_len, c.s.k_len);
        if (need_mask && (j < (r ? c.lo1 : c.lo0) || j >= (r ? c.hi1 : c.hi0))) sc[v] = NEG_INF;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = m_run[r];
#pragma unroll
        for (int v = 0; v < BLOCK_N / 2; ++v)
            if ((v / 2) % 2 == r) mx = fmaxf(mx, sc[v]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float m_scaled = mx == NEG_INF ? 0.f : mx * c.sl2;
        corr[r] = exp2f(m_run[r] * c.sl2 - m_scaled);
#if FA_DTYPE == 3
        const float m_p = m_scaled - P_LOG2_SCALE;
#define M_P m_p
#else
#define M_P m_scaled
#endif
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < BLOCK_N / 2; ++v)
            if ((v / 2) % 2 == r) {
                sc[v] = exp2f(sc[v] * c.sl2 - M_P);
                sum += sc[v];
            }
        l_run[r] = l_run[r] * corr[r] + sum;
        m_run[r] = mx;
    }
}

DEV void rescale_o(float (&o)[HEAD_DIM / 2], const float (&corr)[2]) {
    fence_regs(o);
#pragma unroll
    for (int v = 0; v < HEAD_DIM / 2; ++v) o[v] *= corr[(v / 2) % 2];
}

#if FA_DTYPE == 3
// P as the A operand of the next wgmma, in Vt's key order (fp8_vt.cu): register x of 32-key
// step kk holds row 8 (x % 2) and logical keys 16 (x / 2) + 4 (lane % 4) + {0..3}, which are
// the accumulators i, i + 1, i + 4, i + 5 below.
DEV void to_p(const float (&sc)[BLOCK_N / 2], uint32_t (&pa)[PA_STEPS][4]) {
#pragma unroll
    for (int kk = 0; kk < PA_STEPS; ++kk)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            const int i = 16 * kk + 8 * (x / 2) + 2 * (x % 2);
            pa[kk][x] = pack_e4m3x4(sc[i], sc[i + 1], sc[i + 4], sc[i + 5]);
        }
}
#else
// P as the A operand of the next wgmma: S's accumulator layout is A's register layout.
DEV void to_p(const float (&sc)[BLOCK_N / 2], uint32_t (&pa)[PA_STEPS][4]) {
#pragma unroll
    for (int kk = 0; kk < PA_STEPS; ++kk)
#pragma unroll
        for (int x = 0; x < 4; ++x) pa[kk][x] = PACK2(sc[8 * kk + 2 * x], sc[8 * kk + 2 * x + 1]);
}
#endif

// ---- consumer warpgroups ----------------------------------------------------------------

// The key blocks [n_lo, n_hi) of one tile for this warpgroup's 64 rows: O, m and l of the
// thread's two rows accumulate; `it` and `q_count` advance with the ring and the Q buffer.
// Why over 100 lines: the pipeline's prologue, steady state and last block share the ring
// counters and the pingpong turn, and read best in one place.
DEV void consumer_tile(const BlockCtx& ctx, const Smem& sm, int wg, int n_lo, int n_hi, float (&o)[HEAD_DIM / 2],
                       float (&m_run)[2], float (&l_run)[2], uint32_t& it, uint32_t& q_count) {
    const KvRing& ring = sm.kv;
    mbar_wait(sm.q_full, q_count & 1);
    ++q_count;
    const uint32_t q_wg = sm.q + wg * 64 * 128;
    float sc[BLOCK_N / 2];
    uint32_t pa[PA_STEPS][4];
    float corr[2];

    // Prologue: S for the first block, its softmax, P.
    {
        const uint32_t st = it % STAGES;
        mbar_wait(ring.k_full(st), (it / STAGES) & 1);
        pingpong_wait(wg);
        wg_fence();
        issue_qk(sc, q_wg, ring.k_slot(st));
        wg_commit();
        pingpong_release(wg);
        wg_wait<0>();
        fence_regs(sc);
        mbar_arrive(ring.k_empty(st));
        if (EARLY_Q_RELEASE && n_hi - n_lo == 1) mbar_arrive(sm.q_empty);
        softmax_block(ctx, sc, n_lo * BLOCK_N, m_run, l_run, corr);
        to_p(sc, pa);
    }
    // Steady state: while the tensor cores run P_n V_n, this warpgroup does the softmax
    // of S_{n+1}, issued just before (intra-warpgroup overlap); the other warpgroup's
    // GEMMs fill this one's softmax gaps (pingpong).
    for (int n = n_lo; n + 1 < n_hi; ++n, ++it) {
        const uint32_t st = it % STAGES, st1 = (it + 1) % STAGES;
        mbar_wait(ring.k_full(st1), ((it + 1) / STAGES) & 1);
        mbar_wait(ring.v_full(st), (it / STAGES) & 1);
#if !RESCALE_UNDER_QK
        rescale_o(o, corr);  // a no-op scale of zeros on the first block
#endif
        pingpong_wait(wg);
        wg_fence();
        issue_qk(sc, q_wg, ring.k_slot(st1));
        wg_commit();
#if RESCALE_UNDER_QK
        // Rescale O for the previous softmax while S_{n+1} runs on the tensor cores.
        rescale_o(o, corr);  // a no-op scale of zeros on the first block
        wg_fence();
#endif
        issue_pv(o, pa, ring.v_slot(st));
        wg_commit();
        pingpong_release(wg);
        wg_wait<SOFTMAX_UNDER_PV>();  // S_{n+1} is ready; P_n V_n may still run
        fence_regs(sc);
        mbar_arrive(ring.k_empty(st1));
        // That was this tile's last use of Q: let the producer load the next tile's.
        if (EARLY_Q_RELEASE && n + 2 == n_hi) mbar_arrive(sm.q_empty);
        // A branch the compiler cannot fold (k_len > 0 always holds here) keeps the softmax
        // in its own basic block, so ptxas does not hoist the wait below above it and
        // the softmax overlaps P V.
        if (ctx.s.k_len > 0) softmax_block(ctx, sc, (n + 1) * BLOCK_N, m_run, l_run, corr);
        wg_wait<0>();
        fence_regs(o);
        mbar_arrive(ring.v_empty(st));
        to_p(sc, pa);
    }
    // Last block: P V only.
    {
        const uint32_t st = it % STAGES;
        mbar_wait(ring.v_full(st), (it / STAGES) & 1);
        rescale_o(o, corr);
        pingpong_wait(wg);
        wg_fence();
        issue_pv(o, pa, ring.v_slot(st));
        wg_commit();
        pingpong_release(wg);
        wg_wait<0>();
        fence_regs(o);
        mbar_arrive(ring.v_empty(st));
        ++it;
    }
    if (!EARLY_Q_RELEASE) mbar_arrive(sm.q_empty);
}

// Normalises O and writes it and the LSE for the thread's two rows of the tile.
DEV void epilogue(const Params& p, const Tile& tile, const SeqBounds& s, int m0, int row0, int col0, int lane,
                  float sl2, const float (&o)[HEAD_DIM / 2], const float (&m_run)[2], const float (&l_run)[2]
#if FA_DTYPE == 3
                  , float v_descale
#endif
) {
    elem_t* out = (elem_t*)p.out;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        const int i = m0 + row0 + 8 * r;
        if (i >= s.q_len) continue;
#if FA_DTYPE == 3
        const float inv = l > 0.f ? v_descale / l : 0.f;
        const float log2_l = __log2f(l) - P_LOG2_SCALE;
#define LOG2_L log2_l
#else
        const float inv = l > 0.f ? 1.f / l : 0.f;
#define LOG2_L __log2f(l)
#endif
        uint32_t* orow = (uint32_t*)(out + ((uint64_t)(s.q_start + i) * p.heads_q + tile.h) * HEAD_DIM);
#pragma unroll
        for (int c = 0; c < HEAD_DIM / 8; ++c)
            orow[(8 * c + col0) / 2] = PACK2(o[4 * c + 2 * r] * inv, o[4 * c + 2 * r + 1] * inv);
        if (p.lse && lane % 4 == 0)
            p.lse[lse_index(p, tile.b, tile.h, s.q_start, i)] =
                l > 0.f ? (m_run[r] * sl2 + LOG2_L) * LN2 : NEG_INF;
    }
}

#if FA_DTYPE == 3
// The tile's (batch, KV head) in the descales (recomputed where used: registers are scarce).
DEV int descale_index(const Params& p, const Tile& tile) { return tile.b * p.heads_kv + tile.h / p.group; }
#endif

// Walks this CTA's tiles for one consumer warpgroup (`wg` 0 or 1: which 64 rows of a tile).
DEV void consumer_loop(const Params& p, const Smem& sm, int wg, int warp, int lane FP8_PARAM) {
    const int warp_in_wg = warp % 4;
    // This thread's two rows within the tile (accumulator layout of wgmma m64nN).
    const int row0 = wg * 64 + warp_in_wg * 16 + lane / 4;
    const int col0 = 2 * (lane % 4);
    const float sl2 = SCORE_MOD ? LOG2E : p.scale * LOG2E;
    // Warpgroup 0 issues first: warpgroup 1 releases it once.
    if (wg == 1) pingpong_release(wg);

    uint32_t it = 0, q_count = 0;
    for (int t = blockIdx.x; t < p.total_tiles; t += gridDim.x) {
        const auto [tile, s, n_lo, n_hi] = tile_work(p, t);
        const int m0 = tile.m_block * BLOCK_M;
        if (m0 >= s.q_len) continue;

        float o[HEAD_DIM / 2];
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 2; ++i) o[i] = 0.f;
        float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};
        int lo[2], hi[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) mask_keys(p, m0 + row0 + 8 * r, s.q_len, s.k_len, lo[r], hi[r]);
        const float slope = SCORE_MOD ? alibi_slope(p, tile.b, tile.h) : 0.f;
        // The whole tile's rows [m0, m_end) see every key in [full_lo, full_hi).
        const int m_end = min(m0 + BLOCK_M, s.q_len);
        int full_lo, full_hi, tmp;
        mask_keys(p, m_end - 1, s.q_len, s.k_len, full_lo, tmp);
        mask_keys(p, m0, s.q_len, s.k_len, tmp, full_hi);

#if FA_DTYPE == 3
        // This head's descales: q and k's scale the scores (through sl2 without score mods).
        const float qk_descale = f.descale_q[descale_index(p, tile)] * f.descale_k[descale_index(p, tile)];
        const float sl2_t = SCORE_MOD ? sl2 : sl2 * qk_descale;
        if (n_lo < n_hi) {
            const BlockCtx ctx{p,     s,     m0,    row0,  col0,  slope, sl2_t,     full_lo,
                               full_hi, lo[0], lo[1], hi[0], hi[1], qk_descale};
            consumer_tile(ctx, sm, wg, n_lo, n_hi, o, m_run, l_run, it, q_count);
        }
        epilogue(p, tile, s, m0, row0, col0, lane, sl2_t, o, m_run, l_run, f.descale_v[descale_index(p, tile)]);
#else
        if (n_lo < n_hi) {
            const BlockCtx ctx{p, s, m0, row0, col0, slope, sl2, full_lo, full_hi, lo[0], lo[1], hi[0], hi[1]};
            consumer_tile(ctx, sm, wg, n_lo, n_hi, o, m_run, l_run, it, q_count);
        }
        epilogue(p, tile, s, m0, row0, col0, lane, sl2, o, m_run, l_run);
#endif
    }
}

// ---- the kernel -------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
fa_hopper_fwd(const __grid_constant__ TensorMap tm_q, const __grid_constant__ TensorMap tm_k,
              const __grid_constant__ TensorMap tm_v, const __grid_constant__ Params p
#if FA_DTYPE == 3
              , const __grid_constant__ Fp8Args f
#endif
) {
    extern __shared__ uint8_t smem_raw[];
    // 128-byte swizzle repeats every 1024 bytes: align every tile to 1024.
    const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
    Smem sm;
    sm.q = base;
    sm.kv.k = sm.q + Q_BYTES;
    sm.kv.v = sm.kv.k + STAGES * KV_BYTES;
    const uint32_t bars = sm.kv.v + STAGES * KV_BYTES;
    sm.q_full = bars;
    sm.q_empty = bars + 8;
    sm.kv.bars = bars + 16;
    const int consumer_threads = NUM_THREADS - 128;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        mbar_init(sm.q_full, 1);
        mbar_init(sm.q_empty, consumer_threads);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(sm.kv.k_full(s), 1);
            mbar_init(sm.kv.k_empty(s), consumer_threads);
            mbar_init(sm.kv.v_full(s), 1);
            mbar_init(sm.kv.v_empty(s), consumer_threads);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp < 4) {
        // ================= producer warpgroup =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
        if (warp != 0 || lane != 0) return;
        producer_loop(p, tm_q, tm_k, tm_v, sm FP8_ARG);
        return;
    }

    // ================= consumer warpgroups =================
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
    consumer_loop(p, sm, warp / 4 - 1, warp, lane FP8_ARG);
}
