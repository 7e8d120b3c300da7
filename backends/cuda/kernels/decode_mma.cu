// Split-KV decode with mma.sync (f16 / bf16, sm_80 and later): one CTA per (batch, KV head,
// chunk of keys, block of packed rows). The query heads of one KV head (times seqlen_q) are
// packed into the rows of one tile, so each K/V row is read from memory once for all of them.
//   * fa_decode_mma_w1: a 16-row tile; the 4 warps split every key block into 4 slices
//     (S = Q K^T, online softmax and O += P V per warp), merged through shared memory at the end;
//   * fa_decode_mma_w4: a 64-row tile, one 16-row slice per warp, every warp all keys.
// K and V blocks of BLOCK_N cache rows (found through the block table when paged) stream
// through a ring of STAGES cp.async stages (16-byte copies into XOR-swizzled rows); fragments
// come from ldmatrix (.trans for V). A row's result goes out normalised with its LSE: the final
// output with one split, else the split's partial for fa_decode_combine.
// Compile-time (src/variants.rs, from src/decode_tiles.rs): FA_DTYPE (1 f16, 2 bf16),
// HEAD_DIM (64, 128 or 256: the bucket of head_dim and head_dim_v), BLOCK_N, STAGES, NUM_WARPS.
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, ptx.cuh, decode.cuh, append.cu,
// combine.cu.

#if !defined(HEAD_DIM) || !defined(BLOCK_N) || !defined(STAGES) || !defined(NUM_WARPS)
#error "the decode kernel's tile constants come from src/variants.rs"
#endif
#define THREADS (NUM_WARPS * 32)
#define ROW_BYTES (HEAD_DIM * 2)
#define CHUNKS (HEAD_DIM / 8)
#define D_TILES (HEAD_DIM / 8)
#define STAGE_BYTES (2 * BLOCK_N * ROW_BYTES)
#define Q_OFFSET (STAGES * STAGE_BYTES)
#if HEAD_DIM % 64 != 0 || NUM_WARPS != 4 || BLOCK_N % 64 != 0 || STAGES < 1
#error "decode tiles: head dims in multiples of 64, 4 warps, key blocks of whole 16-key slices per warp"
#endif
// The end-of-loop merge (every warp's O, m and l in f32) reuses the stage buffers.
static_assert(NUM_WARPS * 16 * (HEAD_DIM + 2) * 4 <= STAGES * STAGE_BYTES + 16 * ROW_BYTES,
              "the merge fits in shared memory");

#if FA_DTYPE == 2
#define PACK2 pack_bf16x2
#else
#define PACK2 pack_f16x2
#endif

// Rows of 128-byte multiples: chunks swap within groups of 8 by r % 8 (no bank conflicts for
// ldmatrix and for the quarter-warps of a copy).
DEV uint32_t tile_offset(int r, int c) { return r * ROW_BYTES + ((c ^ (r & 7)) << 4); }

// What the softmax needs about this thread's two rows (lane / 4 and + 8 of its warp's 16).
struct MmaRows {
    int lo[2], hi[2];  // visible keys
    int i[2];          // query row
    float slope[2];
    float sl2;         // score units -> log2 units
    bool has_mod;
};

// Copies the packed q rows r0 .. r1 of the tile (zeros past r1 and past head_dim).
template <int ROWS>
DEV void load_q(const DecodeParams& dp, const DecodeTile& t, uint8_t* smem, uint32_t base, bool vec) {
    const int d = dp.attn.head_dim;
    const elem_t* q = (const elem_t*)dp.attn.q;
    if (vec) {
        for (int x = threadIdx.x; x < ROWS * CHUNKS; x += THREADS) {
            const int r = x / CHUNKS, c = x % CHUNKS;
            const bool ok = t.r0 + r < t.r1 && c * 8 < d;
            const elem_t* src = ok ? q + q_row_at(dp, t, t.r0 + r) + c * 8 : q;
            cp_async_16(base + Q_OFFSET + tile_offset(r, c), src, ok);
        }
    } else {
        for (int x = threadIdx.x; x < ROWS * HEAD_DIM; x += THREADS) {
            const int r = x / HEAD_DIM, col = x % HEAD_DIM;
            const bool ok = t.r0 + r < t.r1 && col < d;
            const uint16_t val = ok ? q[q_row_at(dp, t, t.r0 + r) + col] : (uint16_t)0;
            *(uint16_t*)(smem + Q_OFFSET + tile_offset(r, col / 8) + (col % 8) * 2) = val;
        }
    }
}

// K and V of key block n into stage `slot`.
DEV void load_stage(const DecodeParams& dp, const DecodeTile& t, uint8_t* smem, uint32_t base, int slot, int n,
                    bool vec) {
    const uint32_t k_off = slot * STAGE_BYTES, v_off = k_off + BLOCK_N * ROW_BYTES;
    const Params& p = dp.attn;
    load_cache_rows<BLOCK_N, CHUNKS, THREADS>(dp, smem, base, k_off, (const elem_t*)p.k, t.b, t.kv_h, n * BLOCK_N,
                                              t.k_len, p.head_dim, vec);
    load_cache_rows<BLOCK_N, CHUNKS, THREADS>(dp, smem, base, v_off, (const elem_t*)p.v, t.b, t.kv_h, n * BLOCK_N,
                                              t.k_len, p.head_dim_v, vec);
}

// One warp's slice (keys kbase .. kbase + KEYS of the block at j0): S = Q K^T, mask and score
// mods, the online-softmax update of m, l and O, then O += P V.
template <int KEYS>
DEV void attend_slice(const DecodeTile& t, const MmaRows& c, const Params& p, uint32_t q_tile, uint32_t k_tile,
                      uint32_t v_tile, int q_row0, int kbase, int j0, float (&o)[D_TILES][4], float (&m)[2],
                      float (&l)[2]) {
    constexpr int WN = KEYS / 8;
    const int lane = threadIdx.x % 32;
    const int k_steps = (p.head_dim + 15) / 16, v_steps = (p.head_dim_v + 15) / 16;
    float sc[WN][4];
#pragma unroll
    for (int nt = 0; nt < WN; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        if (kk >= k_steps) break;
        uint32_t a[4];
        ldmatrix_x4(a, q_tile + tile_offset(q_row0 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
        for (int nt = 0; nt < WN / 2; ++nt) {
            uint32_t b[4];
            ldmatrix_x4(b, k_tile + tile_offset(kbase + nt * 16 + ((lane >> 4) << 3) + (lane & 7),
                                                2 * kk + ((lane >> 3) & 1)));
            mma_16816(sc[2 * nt], a, b[0], b[1]);
            mma_16816(sc[2 * nt + 1], a, b[2], b[3]);
        }
    }
    const int jw = j0 + kbase;  // key of this slice's first column
    const bool need_mask = c.has_mod || jw < t.full_lo || jw + KEYS > t.full_hi || jw + KEYS > t.k_len;
    if (need_mask) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int nt = 0; nt < WN; ++nt)
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    const int j = jw + nt * 8 + 2 * (lane % 4) + (e & 1);
                    float x = sc[nt][e];
                    if (c.has_mod) x = score_mod(p, x, c.slope[r], c.i[r], j, t.q_len, t.k_len);
                    if (j < c.lo[r] || j >= c.hi[r]) x = NEG_INF;
                    sc[nt][e] = x;
                }
    }
    // NaN: fmaxf skips it, but a NaN score makes P and l NaN, so the row's out and LSE are NaN.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = m[r];
#pragma unroll
        for (int nt = 0; nt < WN; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float m_scaled = mx == NEG_INF ? 0.f : mx * c.sl2;  // nothing visible yet: P = 0
        const float corr = exp2f(m[r] * c.sl2 - m_scaled);
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < WN; ++nt)
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) {
                sc[nt][e] = exp2f(sc[nt][e] * c.sl2 - m_scaled);
                sum += sc[nt][e];
            }
        l[r] = l[r] * corr + sum;
        m[r] = mx;
#pragma unroll
        for (int dt = 0; dt < D_TILES; ++dt) {
            o[dt][2 * r] *= corr;
            o[dt][2 * r + 1] *= corr;
        }
    }
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; ++kk) {
        // S's accumulators of two 8-key tiles are the A fragment of one 16-key step of P V.
        const uint32_t pa[4] = {PACK2(sc[2 * kk][0], sc[2 * kk][1]), PACK2(sc[2 * kk][2], sc[2 * kk][3]),
                                PACK2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]), PACK2(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
        for (int nd = 0; nd < D_TILES / 2; ++nd) {
            if (nd >= v_steps) break;
            uint32_t b[4];
            ldmatrix_x4_trans(b, v_tile + tile_offset(kbase + kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                                      2 * nd + (lane >> 4)));
            mma_16816(o[2 * nd], pa, b[0], b[1]);
            mma_16816(o[2 * nd + 1], pa, b[2], b[3]);
        }
    }
}

// Merges the warps that share a row slice (their key slices) and stores every row of the tile:
// each warp leaves O, m (log2 units) and l in shared memory, then the CTA combines them per
// (row, column), M = max m_w, L = sum 2^(m_w - M) l_w, out = sum 2^(m_w - M) O_w / L.
template <int MW>
DEV void merge_and_store(const DecodeParams& dp, const DecodeTile& t, uint8_t* smem, const MmaRows& c,
                         const float (&o)[D_TILES][4], const float (&m)[2], const float (&l)[2]) {
    constexpr int KW = NUM_WARPS / MW;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, dv = dp.attn.head_dim_v;
    float* ow = (float*)smem;                     // [warp][16][HEAD_DIM]
    float* ml = ow + NUM_WARPS * 16 * HEAD_DIM;   // [warp][m 16, l 16]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = lane / 4 + 8 * r;
        float lr = l[r];
        lr += __shfl_xor_sync(0xffffffff, lr, 1);
        lr += __shfl_xor_sync(0xffffffff, lr, 2);
        if (lane % 4 == 0) {
            ml[warp * 32 + row] = m[r] == NEG_INF ? NEG_INF : m[r] * c.sl2;
            ml[warp * 32 + 16 + row] = lr;
        }
#pragma unroll
        for (int dt = 0; dt < D_TILES; ++dt) {
            const int col = dt * 8 + 2 * (lane % 4);
            ow[(warp * 16 + row) * HEAD_DIM + col] = o[dt][2 * r];
            ow[(warp * 16 + row) * HEAD_DIM + col + 1] = o[dt][2 * r + 1];
        }
    }
    __syncthreads();
    const int rows = (t.r1 - t.r0) * dv;
    for (int x = threadIdx.x; x < rows; x += THREADS) {
        const int lr = x / dv, col = x % dv, slice = lr / 16, row = lr % 16;
        float mx = NEG_INF;
#pragma unroll
        for (int k = 0; k < KW; ++k) mx = fmaxf(mx, ml[(slice + MW * k) * 32 + row]);
        float sum = 0.f, acc = 0.f;
#pragma unroll
        for (int k = 0; k < KW; ++k) {
            const int w = slice + MW * k;
            const float mw = ml[w * 32 + row];
            // Equal (also both -inf: a slice that saw nothing, or only NaN scores): weight 1.
            const float wgt = mw == mx ? 1.f : exp2f(mw - mx);
            sum += wgt * ml[w * 32 + 16 + row];
            acc += wgt * ow[(w * 16 + row) * HEAD_DIM + col];
        }
        const float out = sum == 0.f ? 0.f : acc / sum;  // NaN stays NaN
        const float lse = sum == 0.f ? NEG_INF : (mx + __log2f(sum)) * LN2;
        store_row(dp, t, t.r0 + lr, col, out, col == 0, lse);
    }
}

template <int MW>
DEV void decode_mma(const DecodeParams& dp) {
    constexpr int KW = NUM_WARPS / MW, KEYS = BLOCK_N / KW, TILE_ROWS = 16 * MW;
    static_assert(KEYS % 16 == 0, "each warp's key slice is whole 16-key steps");
    extern __shared__ __align__(128) uint8_t smem[];
    const uint32_t base = smem_addr(smem);
    const Params& p = dp.attn;
    const DecodeTile t = decode_tile_of(dp, TILE_ROWS, BLOCK_N);
    if (stored_if_empty(dp, t)) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int slice = warp % MW, kbase = (warp / MW) * KEYS;
    const bool vec = p.head_dim % 8 == 0 && p.head_dim_v % 8 == 0 && q_rows_16b(dp);

    MmaRows c;
    c.has_mod = p.softcap > 0.f || p.alibi != nullptr;
    c.sl2 = c.has_mod ? LOG2E : p.scale * LOG2E;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int pr = t.r0 + slice * 16 + lane / 4 + 8 * r;
        c.i[r] = pr / p.group;
        c.slope[r] = alibi_slope(p, t.b, t.kv_h * p.group + pr % p.group);
        if (pr < t.r1) {
            mask_keys(p, c.i[r], t.q_len, t.k_len, c.lo[r], c.hi[r]);
        } else {
            c.lo[r] = c.hi[r] = 0;  // a padding row: sees nothing, never stored
        }
    }
    float o[D_TILES][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;

    load_q<TILE_ROWS>(dp, t, smem, base, vec);  // lands with the first stage
    stream_blocks(
        t.n0, t.n1, [&](int slot, int n) { load_stage(dp, t, smem, base, slot, n, vec); },
        [&](int slot, int n) {
            const uint32_t k_tile = base + slot * STAGE_BYTES, v_tile = k_tile + BLOCK_N * ROW_BYTES;
            attend_slice<KEYS>(t, c, p, base + Q_OFFSET, k_tile, v_tile, slice * 16, kbase, n * BLOCK_N, o, m, l);
        });
    merge_and_store<MW>(dp, t, smem, c, o, m, l);
}

// grid: batch * heads_kv * num_splits * row_blocks CTAs (decode_tile_of); block: THREADS;
// dynamic shared memory: STAGES * STAGE_BYTES + 16 * MW rows of Q (src/decode_tiles.rs).
extern "C" __global__ void __launch_bounds__(THREADS) fa_decode_mma_w1(const __grid_constant__ DecodeParams dp) {
    decode_mma<1>(dp);
}
extern "C" __global__ void __launch_bounds__(THREADS) fa_decode_mma_w4(const __grid_constant__ DecodeParams dp) {
    decode_mma<4>(dp);
}
