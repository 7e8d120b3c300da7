// FlashAttention forward with mma.sync, after FlashAttention-2, for sm_80 and later (A100,
// sm_86 A10/A40/RTX 30, sm_89 L4/L40/RTX 40, sm_90 H100/H200, and newer):
//   * a CTA of NUM_WARPS warps owns BLOCK_M query rows of one (batch, head); each warp owns
//     M_TILES 16-row tiles, with S = Q K^T, the online softmax state and O in registers (f32);
//   * Q, K and V blocks are copied global -> shared with cp.async (16 bytes per copy) into
//     XOR-swizzled rows and read into mma fragments with ldmatrix (x4; .trans for V);
//   * S = Q K^T and O += P V run on mma.sync m16n8k16 (f16/bf16 in, f32 accumulate); P goes
//     from S's accumulators to A fragments without leaving registers;
//   * K and V take turns as the two buffers of the copy pipeline: V_n is copied while
//     S_n = Q K_n^T runs, K_{n+1} while O += P_n V_n runs (FlashAttention-2's schedule);
//   * key blocks the causal / window mask hides are skipped, partial ones masked per element.
// The head dim is a compiled bucket (HEAD_DIM >= head_dim, head_dim_v); shared memory past the
// real dims is zero and k-steps / output tiles past them are skipped. Head dims that are not a
// multiple of 8 cannot use 16-byte copies and are loaded element by element (still exact).
// Compile-time (src/variants.rs, from src/tiles.rs MmaTiles): FA_DTYPE (1 f16, 2 bf16),
// HEAD_DIM (a multiple of 32), BLOCK_M, BLOCK_N, NUM_WARPS.
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, tiles.cuh, ptx.cuh, mma_tile.cuh.

#if !defined(HEAD_DIM) || !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(NUM_WARPS)
#error "the mma kernel's tile constants come from src/variants.rs"
#endif
#define THREADS (NUM_WARPS * 32)
#define M_TILES (BLOCK_M / (16 * NUM_WARPS))  // 16-row tiles per warp
#define N_TILES (BLOCK_N / 8)                 // 8-key tiles of S
#define D_TILES (HEAD_DIM / 8)                // 8-column tiles of O
#define ROW_BYTES (HEAD_DIM * 2)
#if M_TILES * 16 * NUM_WARPS != BLOCK_M || BLOCK_N % 16 != 0 || HEAD_DIM % 32 != 0
#error "mma tiles: whole 16-row tiles per warp, 16-key steps, head dims in multiples of 32"
#endif

// The tiles' XOR swizzle (mma_tile.cuh `swz`: no bank conflicts for ldmatrix and the copies).
DEV uint32_t swizzle(int r, int c) { return swz<ROW_BYTES>(r, c); }

// Q, K and V blocks are copied by mma_tile.cuh's `load_rows` (cp.async, zeros past the
// sequence's end and past head_dim in the bucket).

// ---- scores: S = Q K^T ------------------------------------------------------------------

// This warp's S for one key block: k-steps of 16 columns up to `k_steps` (head_dim rounded up
// to 16); A fragments of Q (rows q_row0..) and B fragments of K (two 8-key tiles per ldmatrix).
DEV void scores(float (&sc)[M_TILES][N_TILES][4], uint32_t q_tile, uint32_t k_tile, int q_row0, int lane,
                int k_steps) {
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        if (kk >= k_steps) break;
        uint32_t a[M_TILES][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
            ldmatrix_x4(a[mt], q_tile + swizzle(q_row0 + mt * 16 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
        for (int nt = 0; nt < N_TILES / 2; ++nt) {
            uint32_t b[4];
            ldmatrix_x4(b, k_tile + swizzle(nt * 16 + ((lane >> 4) << 3) + (lane & 7), 2 * kk + ((lane >> 3) & 1)));
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt) {
                mma_16816(sc[mt][2 * nt], a[mt], b[0], b[1]);
                mma_16816(sc[mt][2 * nt + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// ---- score mods, mask, online softmax -----------------------------------------------------

// What the softmax needs about the tile and this thread's rows (2 per 16-row tile: row0 + 16 mt
// and row0 + 16 mt + 8) and columns (2 per 8-key tile: col0 and col0 + 1).
struct RowCtx {
    const Params& p;
    SeqBounds s;
    int row0;              // this thread's first query row within the sequence
    int col0;
    int full_lo, full_hi;  // keys every row of the block sees
    float slope, sl2;      // sl2: factor from score units to log2 units
    bool has_mod;          // softcap or ALiBi: scores go through score_mod
    DEV int row(int mt, int r) const { return row0 + 16 * mt + 8 * r; }
};

// Score mods and mask of the key block starting at j0, then the online softmax update: O is
// rescaled, m and l advance, and P (unnormalised) is packed into the A fragments of P V, so
// the f32 scores die here (registers). NaN: fmaxf skips it, but a NaN score makes P and l
// NaN, so the row's out and LSE become NaN (as FlashAttention's do).
DEV void softmax_block(const RowCtx& c, float (&sc)[M_TILES][N_TILES][4], int j0, float (&m_run)[M_TILES][2],
                       float (&l_run)[M_TILES][2], float (&o)[M_TILES][D_TILES][4],
                       uint32_t (&pa)[M_TILES][BLOCK_N / 16][4]) {
    const bool need_mask = j0 < c.full_lo || j0 + BLOCK_N > c.full_hi || j0 + BLOCK_N > c.s.k_len;
    if (c.has_mod || need_mask) {
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                int lo = 0, hi = c.s.k_len;
                if (need_mask) mask_keys(c.p, c.row(mt, r), c.s.q_len, c.s.k_len, lo, hi);
#pragma unroll
                for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; ++e) {
                        const int j = j0 + nt * 8 + c.col0 + (e & 1);
                        float x = sc[mt][nt][e];
                        if (c.has_mod) x = score_mod(c.p, x, c.slope, c.row(mt, r), j, c.s.q_len, c.s.k_len);
                        if (need_mask && (j < lo || j >= hi)) x = NEG_INF;
                        sc[mt][nt][e] = x;
                    }
            }
    }
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m_run[mt][r];
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt) mx = fmaxf(mx, fmaxf(sc[mt][nt][2 * r], sc[mt][nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float m_scaled = mx == NEG_INF ? 0.f : mx * c.sl2;  // fully masked so far: P = 0
            const float corr = exp2f(m_run[mt][r] * c.sl2 - m_scaled);
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    sc[mt][nt][e] = exp2f(sc[mt][nt][e] * c.sl2 - m_scaled);
                    sum += sc[mt][nt][e];
                }
            l_run[mt][r] = l_run[mt][r] * corr + sum;
            m_run[mt][r] = mx;
#pragma unroll
            for (int dt = 0; dt < D_TILES; ++dt) {
                o[mt][dt][2 * r] *= corr;
                o[mt][dt][2 * r + 1] *= corr;
            }
        }
    // S's accumulators of two 8-key tiles are the A fragment of one 16-key step of P V.
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            pa[mt][kk][0] = PACK2(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
            pa[mt][kk][1] = PACK2(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
            pa[mt][kk][2] = PACK2(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
            pa[mt][kk][3] = PACK2(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
        }
}

// ---- P V ----------------------------------------------------------------------------------

// O += P V for one key block, 16 keys per step (P's A fragments from softmax_block); V's B
// fragments come transposed (ldmatrix .trans, two 8-column tiles per load), up to `v_steps`
// 16-column steps (head_dim_v rounded up to 16).
DEV void pv(float (&o)[M_TILES][D_TILES][4], const uint32_t (&pa)[M_TILES][BLOCK_N / 16][4], uint32_t v_tile,
            int lane, int v_steps) {
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
#pragma unroll
        for (int nd = 0; nd < D_TILES / 2; ++nd) {
            if (nd >= v_steps) break;
            uint32_t b[4];
            ldmatrix_x4_trans(b, v_tile + swizzle(kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7), 2 * nd + (lane >> 4)));
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt) {
                mma_16816(o[mt][2 * nd], pa[mt][kk], b[0], b[1]);
                mma_16816(o[mt][2 * nd + 1], pa[mt][kk], b[2], b[3]);
            }
        }
    }
}

// ---- store O and LSE ----------------------------------------------------------------------

// Normalises O and writes it and the LSE of this thread's rows. A row that saw no key gets
// out 0 and LSE -inf; l NaN stays NaN in both.
DEV void store(const RowCtx& c, int h, int b, int lane, const float (&o)[M_TILES][D_TILES][4],
               const float (&m_run)[M_TILES][2], const float (&l_run)[M_TILES][2]) {
    const Params& p = c.p;
    const int dv = p.head_dim_v;
    elem_t* out = (elem_t*)p.out;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_run[mt][r];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const int i = c.row(mt, r);
            if (i >= c.s.q_len) continue;
            const float inv = l == 0.f ? 0.f : 1.f / l;
            const uint64_t row = ((uint64_t)(c.s.q_start + i) * p.heads_q + h) * dv;
#pragma unroll
            for (int dt = 0; dt < D_TILES; ++dt) {
                const int col = dt * 8 + c.col0;
                if (col >= dv) break;
                const float x0 = o[mt][dt][2 * r] * inv, x1 = o[mt][dt][2 * r + 1] * inv;
                if (dv % 2 == 0) {
                    *(uint32_t*)(out + row + col) = PACK2(x0, x1);  // 4-byte aligned: dv, col even
                } else {
                    store_elem(out, row + col, x0);
                    if (col + 1 < dv) store_elem(out, row + col + 1, x1);
                }
            }
            if (p.lse && lane % 4 == 0)
                p.lse[lse_index(p, b, h, c.s.q_start, i)] =
                    l == 0.f ? NEG_INF : (m_run[mt][r] * c.sl2 + __log2f(l)) * LN2;
        }
}

// ---- the kernel ---------------------------------------------------------------------------

// grid: one CTA per tile, p.total_tiles (head-major, last query block first: decode_tile);
// block: THREADS; dynamic shared memory: (BLOCK_M + 2 BLOCK_N) HEAD_DIM 16-bit values.
extern "C" __global__ void __launch_bounds__(THREADS) fa_mma_fwd(const __grid_constant__ Params p) {
    extern __shared__ __align__(128) uint8_t smem[];
    const uint32_t smem_base = smem_addr(smem);
    const uint32_t q_tile = 0, k_tile = BLOCK_M * ROW_BYTES, v_tile = k_tile + BLOCK_N * ROW_BYTES;

    const Tile tile = decode_tile(p, blockIdx.x);
    const SeqBounds s = seq_bounds(p, tile.b);
    const int m0 = tile.m_block * BLOCK_M;
    if (m0 >= s.q_len) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int d = p.head_dim, dv = p.head_dim_v, kv_h = tile.h / p.group;
    const int q_row0 = warp * 16 * M_TILES;  // this warp's first row in the block

    const bool has_mod = p.softcap > 0.f || p.alibi != nullptr;
    RowCtx c{p, s};
    c.row0 = m0 + q_row0 + lane / 4;
    c.col0 = 2 * (lane % 4);
    c.slope = alibi_slope(p, tile.b, tile.h);
    c.sl2 = has_mod ? LOG2E : p.scale * LOG2E;
    c.has_mod = has_mod;
    float o[M_TILES][D_TILES][4], m_run[M_TILES][2], l_run[M_TILES][2];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m_run[mt][r] = NEG_INF;
            l_run[mt][r] = 0.f;
#pragma unroll
            for (int dt = 0; dt < D_TILES; ++dt) o[mt][dt][2 * r] = o[mt][dt][2 * r + 1] = 0.f;
        }
    const int m_end = min(m0 + BLOCK_M, s.q_len);
    int tmp, n_lo, n_hi;
    mask_keys(p, m_end - 1, s.q_len, s.k_len, c.full_lo, tmp);
    mask_keys(p, m0, s.q_len, s.k_len, tmp, c.full_hi);
    mask_key_blocks(p, m0, m_end, s.q_len, s.k_len, BLOCK_N, n_lo, n_hi);

    if (n_lo < n_hi) {
        // 16-byte copies: strided q, k, v come here only with strides that are multiples of 8
        // elements (select_mma), so the head dims decide, as for contiguous inputs.
        const bool vec = d % 8 == 0 && dv % 8 == 0;
        const int k_steps = (d + 15) / 16, v_steps = (dv + 15) / 16;
        // The next K and V blocks' first rows, advanced a block at a time; the token strides
        // (32-bit: KernelParams::new) stay in the constant bank: the largest tiles use all 255
        // registers and have no room for them.
        const elem_t* k = (const elem_t*)p.k + strided_row(p, p.k_strides, tile.b, s.k_start, n_lo * BLOCK_N, kv_h);
        const elem_t* v = (const elem_t*)p.v + strided_row(p, p.v_strides, tile.b, s.k_start, n_lo * BLOCK_N, kv_h);
        load_rows<BLOCK_M, HEAD_DIM, THREADS>(smem, smem_base, q_tile,
                                              (const elem_t*)p.q + strided_row(p, p.q_strides, tile.b, s.q_start, m0, tile.h),
                                              (uint32_t)p.q_strides[1], s.q_len - m0, d, vec);
        load_rows<BLOCK_N, HEAD_DIM, THREADS>(smem, smem_base, k_tile, k, (uint32_t)p.k_strides[1],
                                              s.k_len - n_lo * BLOCK_N, d, vec);
        cp_async_commit();
        for (int n = n_lo; n < n_hi; ++n) {
            const int j0 = n * BLOCK_N;
            cp_async_wait<0>();
            __syncthreads();  // K_n (and Q) are in; every warp is done with V_{n-1}
            load_rows<BLOCK_N, HEAD_DIM, THREADS>(smem, smem_base, v_tile, v, (uint32_t)p.v_strides[1], s.k_len - j0, dv,
                                                  vec);
            v += (uint64_t)BLOCK_N * (uint32_t)p.v_strides[1];
            cp_async_commit();
            float sc[M_TILES][N_TILES][4];
            uint32_t pa[M_TILES][BLOCK_N / 16][4];
            scores(sc, smem_base + q_tile, smem_base + k_tile, q_row0, lane, k_steps);
            softmax_block(c, sc, j0, m_run, l_run, o, pa);
            cp_async_wait<0>();
            __syncthreads();  // V_n is in; every warp is done with K_n
            if (n + 1 < n_hi) {
                k += (uint64_t)BLOCK_N * (uint32_t)p.k_strides[1];
                load_rows<BLOCK_N, HEAD_DIM, THREADS>(smem, smem_base, k_tile, k, (uint32_t)p.k_strides[1],
                                                      s.k_len - j0 - BLOCK_N, d, vec);
                cp_async_commit();
            }
            pv(o, pa, smem_base + v_tile, lane, v_steps);
        }
    }
    store(c, tile.h, tile.b, lane, o, m_run, l_run);
}
