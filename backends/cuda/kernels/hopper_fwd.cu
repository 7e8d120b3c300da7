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
// Compile-time parameters (set by src/variants.rs): FA_DTYPE (1 f16, 2 bf16), HEAD_DIM,
// BLOCK_M, BLOCK_N, STAGES, SCORE_MOD (softcap or ALiBi present).
// Prepended: common.cuh and wgmma.cuh.

#define NUM_THREADS 384
#define COL_BLOCK 64                          // elements per 128-byte swizzled row
#define Q_BYTES (BLOCK_M * HEAD_DIM * 2)
#define KV_BYTES (BLOCK_N * HEAD_DIM * 2)     // one K (or V) stage
#define PRODUCER_REGS 24                      // 24 x 128 + 240 x 256 = the 168 x 384 at launch
#define CONSUMER_REGS 240

// Schedule choices, fixed here after measuring both ways on an H100 (PERF_NOTES.md); the
// tuning hook FLASHATTN_CUDA_EXTRA_DEFINES can flip them for an A/B run.
#ifndef RESCALE_UNDER_QK
#define RESCALE_UNDER_QK 1   // rescale O while S = Q K^T runs (1) or before taking the turn (0)
#endif
#ifndef EARLY_Q_RELEASE
#define EARLY_Q_RELEASE 1    // free Q after the tile's last Q K^T (1) or after its last P V (0)
#endif

#if FA_DTYPE == 2
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

// The tensor map is opaque to the kernel: 128 bytes, 64-byte aligned.
struct __align__(64) TensorMap {
    uint64_t opaque[16];
};

// ---- shared memory, mbarriers, TMA ------------------------------------------------------

DEV uint32_t smem_addr(const void* p) {
    uint32_t r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

DEV void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

// Arrives once and announces `bytes` of TMA traffic that complete this phase.
DEV void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

DEV void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Waits until the phase with this parity has completed.
DEV void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred P1;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// One 3-D box (64 elements x 1 head x rows) from global memory into swizzled shared memory.
DEV void tma_load(uint32_t dst, const TensorMap* map, uint32_t bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(dst),
        "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}

DEV void tma_prefetch_map(const TensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"((uint64_t)map) : "memory");
}

// ---- wgmma ------------------------------------------------------------------------------

DEV void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
DEV void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

// Keeps the compiler from moving accumulator reads/writes across wgmma fences and waits.
template <int N>
DEV void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle. K-major operands: rows of 128 bytes,
// 8-row groups 1024 bytes apart (SBO), LBO unused. N-major (V): LBO = bytes between
// 64-column blocks, SBO = bytes between 8-key groups.
DEV uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    uint64_t d = (uint64_t)((addr & 0x3FFFF) >> 4);
    d |= (uint64_t)((lbo >> 4) & 0x3FFF) << 16;
    d |= (uint64_t)((sbo >> 4) & 0x3FFF) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}

// ---- tile schedule ----------------------------------------------------------------------

struct Tile {
    int b, h, m_block;
};

// Tile order, chosen by the host (tiles.rs: head_major_order). Head-major: consecutive tiles
// are the query blocks of one (batch, head), last block first, so the CTAs of a wave share few
// heads and their K/V stay in L2 (ncu on an H100, d128 / 8k: block-major reached only 61% L2
// hits; head-major measured 7% faster). Block-major: every head's last block first, which
// balances causal work better (head-major measured up to 25% slower there).
DEV Tile decode_tile(const Params& p, int t) {
    // One division for both orders: t = major * minor_count + minor.
    const int per_m = p.heads_q * p.batch;
    const int minor_count = p.head_major_tiles ? p.num_m_blocks : per_m;
    const int major = t / minor_count, minor = t - major * minor_count;
    const int bh = p.head_major_tiles ? major : minor;
    Tile tile;
    tile.m_block = p.num_m_blocks - 1 - (p.head_major_tiles ? minor : major);
    tile.h = bh % p.heads_q;
    tile.b = bh / p.heads_q;
    return tile;
}

// Key blocks this tile visits; empty when the sequence has no rows here or all are masked.
DEV void tile_blocks(const Params& p, const Tile& t, const SeqInfo& s, int& n_lo, int& n_hi) {
    int m0 = t.m_block * BLOCK_M;
    if (m0 >= s.q_len || s.k_len == 0) {
        n_lo = n_hi = 0;
        return;
    }
    int m1 = min(m0 + BLOCK_M, s.q_len);
    block_range(p, m0, m1, s.q_len, s.k_len, BLOCK_N, n_lo, n_hi);
}

// ---- consumer pieces --------------------------------------------------------------------

// What the softmax of one key block needs about the current tile and this thread's two rows.
struct BlockCtx {
    const Params& p;
    SeqInfo s;
    int m0, row0, col0;
    float slope, sl2;
    int full_lo, full_hi;  // keys every row of the tile sees
    int lo0, lo1, hi0, hi1;
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

template <int N>
DEV void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// S = Q K^T for this warpgroup's 64 rows: HEAD_DIM / 16 wgmmas of k = 16.
DEV void issue_qk(float (&sc)[BLOCK_N / 2], uint32_t q_wg, uint32_t k_stage) {
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        uint64_t da = smem_desc(q_wg + (kk / 4) * BLOCK_M * 128 + (kk % 4) * 32, 16, 1024);
        uint64_t db = smem_desc(k_stage + (kk / 4) * BLOCK_N * 128 + (kk % 4) * 32, 16, 1024);
        WGMMA_SS(WG_TYPE, BLOCK_N)(sc, da, db, kk > 0);
    }
}

// O += P V: BLOCK_N / 16 wgmmas, P from registers, V N-major from shared memory.
DEV void issue_pv(float (&o)[HEAD_DIM / 2], const uint32_t (&pa)[BLOCK_N / 16][4], uint32_t v_stage) {
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
        uint64_t db = smem_desc(v_stage + kk * 16 * 128, BLOCK_N * 128, 1024);
        WGMMA_RS(WG_TYPE, HEAD_DIM)(o, pa[kk], db, 1);
    }
}

// Score mods and mask of the block starting at key j0, then the online softmax update:
// sc becomes P (unnormalised, f32), m and l advance, corr is the factor O must be scaled by.
DEV void softmax_block(const BlockCtx& c, float (&sc)[BLOCK_N / 2], int j0, float (&m_run)[2], float (&l_run)[2],
                       float (&corr)[2]) {
    const bool need_mask = j0 < c.full_lo || j0 + BLOCK_N > c.full_hi || j0 + BLOCK_N > c.s.k_len;
#pragma unroll
    for (int v = 0; v < BLOCK_N / 2; ++v) {
        const int r = (v / 2) % 2;
        const int j = j0 + 8 * (v / 4) + c.col0 + (v % 2);
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
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < BLOCK_N / 2; ++v)
            if ((v / 2) % 2 == r) {
                sc[v] = exp2f(sc[v] * c.sl2 - m_scaled);
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

// P as the A operand of the next wgmma: S's accumulator layout is A's register layout.
DEV void to_p(const float (&sc)[BLOCK_N / 2], uint32_t (&pa)[BLOCK_N / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk)
#pragma unroll
        for (int x = 0; x < 4; ++x) pa[kk][x] = PACK2(sc[8 * kk + 2 * x], sc[8 * kk + 2 * x + 1]);
}

// ---- the kernel -------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NUM_THREADS, 1)
fa_hopper_fwd(const __grid_constant__ TensorMap tm_q, const __grid_constant__ TensorMap tm_k,
              const __grid_constant__ TensorMap tm_v, const __grid_constant__ Params p) {
    extern __shared__ uint8_t smem_raw[];
    // 128-byte swizzle repeats every 1024 bytes: align every tile to 1024.
    const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t sQ = base;
    const uint32_t sK = sQ + Q_BYTES;
    const uint32_t sV = sK + STAGES * KV_BYTES;
    const uint32_t bars = sV + STAGES * KV_BYTES;
    const uint32_t q_full = bars, q_empty = bars + 8;
    // k_full[s], k_empty[s], v_full[s], v_empty[s]
#define K_FULL(s) (bars + 16 + 8 * (s))
#define K_EMPTY(s) (bars + 16 + 8 * (STAGES + (s)))
#define V_FULL(s) (bars + 16 + 8 * (2 * STAGES + (s)))
#define V_EMPTY(s) (bars + 16 + 8 * (3 * STAGES + (s)))
    const int consumer_threads = NUM_THREADS - 128;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, consumer_threads);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(K_FULL(s), 1);
            mbar_init(K_EMPTY(s), consumer_threads);
            mbar_init(V_FULL(s), 1);
            mbar_init(V_EMPTY(s), consumer_threads);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp < 4) {
        // ================= producer warpgroup =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
        if (warp != 0 || lane != 0) return;
        tma_prefetch_map(&tm_q);
        tma_prefetch_map(&tm_k);
        tma_prefetch_map(&tm_v);
        uint32_t it = 0, q_count = 0;
        for (int t = blockIdx.x; t < p.total_tiles; t += gridDim.x) {
            Tile tile = decode_tile(p, t);
            SeqInfo s = seq_info(p, tile.b);
            int n_lo, n_hi;
            tile_blocks(p, tile, s, n_lo, n_hi);
            if (n_lo >= n_hi) continue;
            const int kv_h = tile.h / p.group;
            // Q: wait until both consumers are done with the previous tile's Q.
            mbar_wait(q_empty, (q_count & 1) ^ 1);
            mbar_expect_tx(q_full, Q_BYTES);
#pragma unroll 1
            for (int c = 0; c < HEAD_DIM / COL_BLOCK; ++c)
                tma_load(sQ + c * BLOCK_M * 128, &tm_q, q_full, c * COL_BLOCK, tile.h,
                         s.q_start + tile.m_block * BLOCK_M);
            ++q_count;
            for (int n = n_lo; n < n_hi; ++n, ++it) {
                const uint32_t st = it % STAGES, ph = ((it / STAGES) & 1) ^ 1;
                const int row = s.k_start + n * BLOCK_N;
                mbar_wait(K_EMPTY(st), ph);
                mbar_expect_tx(K_FULL(st), KV_BYTES);
#pragma unroll 1
                for (int c = 0; c < HEAD_DIM / COL_BLOCK; ++c)
                    tma_load(sK + st * KV_BYTES + c * BLOCK_N * 128, &tm_k, K_FULL(st), c * COL_BLOCK, kv_h, row);
                mbar_wait(V_EMPTY(st), ph);
                mbar_expect_tx(V_FULL(st), KV_BYTES);
#pragma unroll 1
                for (int c = 0; c < HEAD_DIM / COL_BLOCK; ++c)
                    tma_load(sV + st * KV_BYTES + c * BLOCK_N * 128, &tm_v, V_FULL(st), c * COL_BLOCK, kv_h, row);
            }
        }
        return;
    }

    // ================= consumer warpgroups =================
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
    const int wg = warp / 4 - 1;                  // 0 or 1: which 64 rows of the tile
    const int warp_in_wg = warp % 4;
    // This thread's two rows within the tile (accumulator layout of wgmma m64nN).
    const int row0 = wg * 64 + warp_in_wg * 16 + lane / 4;
    const int col0 = 2 * (lane % 4);
    const float sl2 = SCORE_MOD ? LOG2E : p.scale * LOG2E;
    // Warpgroup 0 issues first: warpgroup 1 releases it once.
    if (wg == 1) pingpong_release(wg);

    uint32_t it = 0, q_count = 0;
    for (int t = blockIdx.x; t < p.total_tiles; t += gridDim.x) {
        Tile tile = decode_tile(p, t);
        SeqInfo s = seq_info(p, tile.b);
        int n_lo, n_hi;
        tile_blocks(p, tile, s, n_lo, n_hi);
        const int m0 = tile.m_block * BLOCK_M;
        if (m0 >= s.q_len) continue;

        float o[HEAD_DIM / 2];
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 2; ++i) o[i] = 0.f;
        float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};
        int lo[2], hi[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) key_range(p, m0 + row0 + 8 * r, s.q_len, s.k_len, lo[r], hi[r]);
        const float slope = SCORE_MOD ? alibi_slope(p, tile.b, tile.h) : 0.f;
        // The whole tile's rows [m0, m_end) see every key in [full_lo, full_hi).
        const int m_end = min(m0 + BLOCK_M, s.q_len);
        int full_lo, full_hi, tmp;
        key_range(p, m_end - 1, s.q_len, s.k_len, full_lo, tmp);
        key_range(p, m0, s.q_len, s.k_len, tmp, full_hi);

        if (n_lo < n_hi) {
            mbar_wait(q_full, q_count & 1);
            ++q_count;
            const uint32_t q_wg = sQ + wg * 64 * 128;
            const BlockCtx ctx{p, s, m0, row0, col0, slope, sl2, full_lo, full_hi, lo[0], lo[1], hi[0], hi[1]};
            float sc[BLOCK_N / 2];
            uint32_t pa[BLOCK_N / 16][4];
            float corr[2];

            // Prologue: S for the first block, its softmax, P.
            {
                const uint32_t st = it % STAGES;
                mbar_wait(K_FULL(st), (it / STAGES) & 1);
                pingpong_wait(wg);
                wg_fence();
                issue_qk(sc, q_wg, sK + st * KV_BYTES);
                wg_commit();
                pingpong_release(wg);
                wg_wait<0>();
                fence_regs(sc);
                mbar_arrive(K_EMPTY(st));
                if (EARLY_Q_RELEASE && n_hi - n_lo == 1) mbar_arrive(q_empty);
                softmax_block(ctx, sc, n_lo * BLOCK_N, m_run, l_run, corr);
                to_p(sc, pa);
            }
            // Steady state: while the tensor cores run P_n V_n, this warpgroup does the softmax
            // of S_{n+1}, issued just before (intra-warpgroup overlap); the other warpgroup's
            // GEMMs fill this one's softmax gaps (pingpong).
            for (int n = n_lo; n + 1 < n_hi; ++n, ++it) {
                const uint32_t st = it % STAGES, st1 = (it + 1) % STAGES;
                mbar_wait(K_FULL(st1), ((it + 1) / STAGES) & 1);
                mbar_wait(V_FULL(st), (it / STAGES) & 1);
#if !RESCALE_UNDER_QK
                rescale_o(o, corr);  // a no-op scale of zeros on the first block
#endif
                pingpong_wait(wg);
                wg_fence();
                issue_qk(sc, q_wg, sK + st1 * KV_BYTES);
                wg_commit();
#if RESCALE_UNDER_QK
                // Rescale O for the previous softmax while S_{n+1} runs on the tensor cores.
                rescale_o(o, corr);  // a no-op scale of zeros on the first block
                wg_fence();
#endif
                issue_pv(o, pa, sV + st * KV_BYTES);
                wg_commit();
                pingpong_release(wg);
                wg_wait<1>();  // S_{n+1} is ready; P_n V_n may still run
                fence_regs(sc);
                mbar_arrive(K_EMPTY(st1));
                // That was this tile's last use of Q: let the producer load the next tile's.
                if (EARLY_Q_RELEASE && n + 2 == n_hi) mbar_arrive(q_empty);
                // A branch the compiler cannot fold (k_len > 0 always holds here) keeps the softmax
                // in its own basic block, so ptxas does not hoist the wait below above it and
                // the softmax overlaps P V.
                if (ctx.s.k_len > 0) softmax_block(ctx, sc, (n + 1) * BLOCK_N, m_run, l_run, corr);
                wg_wait<0>();
                fence_regs(o);
                mbar_arrive(V_EMPTY(st));
                to_p(sc, pa);
            }
            // Last block: P V only.
            {
                const uint32_t st = it % STAGES;
                mbar_wait(V_FULL(st), (it / STAGES) & 1);
                rescale_o(o, corr);
                pingpong_wait(wg);
                wg_fence();
                issue_pv(o, pa, sV + st * KV_BYTES);
                wg_commit();
                pingpong_release(wg);
                wg_wait<0>();
                fence_regs(o);
                mbar_arrive(V_EMPTY(st));
                ++it;
            }
            if (!EARLY_Q_RELEASE) mbar_arrive(q_empty);
        }


        // ---- epilogue: normalise, write O and LSE ----
        elem_t* out = (elem_t*)p.out;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_run[r];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const int i = m0 + row0 + 8 * r;
            if (i >= s.q_len) continue;
            const float inv = l > 0.f ? 1.f / l : 0.f;
            uint32_t* orow = (uint32_t*)(out + ((uint64_t)(s.q_start + i) * p.heads_q + tile.h) * HEAD_DIM);
#pragma unroll
            for (int c = 0; c < HEAD_DIM / 8; ++c)
                orow[(8 * c + col0) / 2] = PACK2(o[4 * c + 2 * r] * inv, o[4 * c + 2 * r + 1] * inv);
            if (p.lse && lane % 4 == 0)
                p.lse[lse_index(p, tile.b, tile.h, s.q_start, i)] =
                    l > 0.f ? (m_run[r] * sl2 + __log2f(l)) * LN2 : NEG_INF;
        }
    }
}
