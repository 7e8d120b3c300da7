// Split-KV decode on CUDA cores (f32 caches, and f16 / bf16 where forced; sm_80 and later for
// cp.async): one CTA per (batch, KV head, chunk of keys, block of 16 packed rows). K and V
// blocks of 32 cache rows stream through the same cp.async ring as the mma.sync kernel
// (decode.cuh) into rows padded by 16 bytes (no bank conflicts); each warp owns 4 packed rows
// and every key of a block: lane j takes key j (its 16-byte chunks against q in shared
// memory, f32 FMA), the online softmax runs across the warp, and O += P V gives lane l the
// columns l, l + 32, ... A key a row does not see adds nothing (its V, even NaN, is skipped).
// Compile-time (src/variants.rs, from src/decode_tiles.rs): FA_DTYPE, HEAD_DIM (bucket),
// BLOCK_N (32), STAGES, NUM_WARPS (4).
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, warp.cuh, ptx.cuh, decode.cuh, append.cu,
// combine.cu.

#if !defined(HEAD_DIM) || !defined(BLOCK_N) || !defined(STAGES) || !defined(NUM_WARPS)
#error "the decode kernel's tile constants come from src/variants.rs"
#endif
#if BLOCK_N != 32 || HEAD_DIM % 32 != 0
#error "the CUDA-core decode kernel takes one key per lane and head dims in multiples of 32"
#endif
#define THREADS (NUM_WARPS * 32)
#define ES ((int)sizeof(elem_t))
#define EPC (16 / ES)                   // elements per 16-byte chunk
#define CHUNKS (HEAD_DIM / EPC)         // chunks per row
#define ROW_STRIDE (HEAD_DIM * ES + 16)  // padded: 8 rows at one chunk hit 8 bank groups
#define STAGE_BYTES (2 * BLOCK_N * ROW_STRIDE)
#define Q_OFFSET (STAGES * STAGE_BYTES)
#define RPW 4                           // packed rows per warp
#define TILE_ROWS (RPW * NUM_WARPS)
#define DV_LANES (HEAD_DIM / 32)        // output columns per lane

DEV uint32_t tile_offset(int r, int c) { return r * ROW_STRIDE + c * 16; }

struct alignas(16) Chunk {
    uint32_t w[4];
};

// The EPC values of a 16-byte chunk of elem_t in shared memory, as f32.
DEV void chunk_f32(const uint8_t* at, float (&f)[EPC]) {
    const Chunk c = *(const Chunk*)at;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#if FA_DTYPE == 0
        f[k] = __uint_as_float(c.w[k]);
#elif FA_DTYPE == 1
        f[2 * k] = f16_to_f32((uint16_t)(c.w[k] & 0xffff));
        f[2 * k + 1] = f16_to_f32((uint16_t)(c.w[k] >> 16));
#else
        f[2 * k] = bf16_to_f32((uint16_t)(c.w[k] & 0xffff));
        f[2 * k + 1] = bf16_to_f32((uint16_t)(c.w[k] >> 16));
#endif
    }
}

// One warp's rows: query row and ALiBi slope of each (the visible keys are recomputed per
// block: keeping them live through the loop made ptxas spill).
struct SimtRows {
    int i[RPW];
    float slope[RPW];
    int count;  // rows of this warp inside the tile
};

// One warp's rows against the key block at j0 (K rows, then V rows, at `stage`).
DEV void attend_block(const Params& p, const DecodeTile& t, const SimtRows& c, const uint8_t* stage, const float* qs,
                      int j0, float (&o)[RPW][DV_LANES], float (&m)[RPW], float (&l)[RPW]) {
    const int lane = threadIdx.x % 32, dv = p.head_dim_v;
    float s[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) s[r] = 0.f;
    const uint8_t* krow = stage + lane * ROW_STRIDE;
    const int k_chunks = (p.head_dim + EPC - 1) / EPC;
    for (int ch = 0; ch < k_chunks; ++ch) {
        float kf[EPC];
        chunk_f32(krow + ch * 16, kf);
#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int e = 0; e < EPC; ++e) s[r] += qs[r * HEAD_DIM + ch * EPC + e] * kf[e];
    }
    const int j = j0 + lane;
    float pr[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        pr[r] = 0.f;
        if (r >= c.count) continue;  // uniform across the warp
        int lo, hi;
        mask_keys(p, c.i[r], t.q_len, t.k_len, lo, hi);
        float x = NEG_INF;
        if (j >= lo && j < hi) x = score_mod(p, s[r], c.slope[r], c.i[r], j, t.q_len, t.k_len);
        float pj, corr;
        if (!online_softmax_step(x, m[r], l[r], pj, corr)) continue;
#pragma unroll
        for (int x2 = 0; x2 < DV_LANES; ++x2) o[r][x2] *= corr;
        pr[r] = pj;
    }
    const uint8_t* vs = stage + BLOCK_N * ROW_STRIDE;
    for (int jj = 0; jj < BLOCK_N; ++jj) {
        float pb[RPW];
        bool any = false;
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            pb[r] = __shfl_sync(0xffffffff, pr[r], jj);
            any |= pb[r] != 0.f;
        }
        if (!any) continue;  // uniform: a key no row sees
#pragma unroll
        for (int x2 = 0; x2 < DV_LANES; ++x2) {
            const int col = lane + 32 * x2;
            if (col >= dv) break;
            const float v = load_elem((const elem_t*)(vs + jj * ROW_STRIDE), col);
#pragma unroll
            for (int r = 0; r < RPW; ++r)
                if (pb[r] != 0.f) o[r][x2] += pb[r] * v;
        }
    }
}

// grid: batch * heads_kv * num_splits * row_blocks CTAs (decode_tile_of); block: THREADS;
// dynamic shared memory: STAGES * STAGE_BYTES + TILE_ROWS * HEAD_DIM floats of q.
extern "C" __global__ void __launch_bounds__(THREADS, 1) fa_decode_simt(const __grid_constant__ DecodeParams dp) {
    extern __shared__ __align__(128) uint8_t smem[];
    const uint32_t base = smem_addr(smem);
    const Params& p = dp.attn;
    const DecodeTile t = decode_tile_of(dp, TILE_ROWS, BLOCK_N);
    if (stored_if_empty(dp, t)) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int d = p.head_dim, dv = p.head_dim_v;
    const bool vec = d % EPC == 0 && dv % EPC == 0;
    // q rows of the tile as f32 (zeros past the tile's rows and past head_dim).
    float* qs = (float*)(smem + Q_OFFSET);
    const elem_t* q = (const elem_t*)p.q;
    for (int x = threadIdx.x; x < TILE_ROWS * HEAD_DIM; x += THREADS) {
        const int r = x / HEAD_DIM, col = x % HEAD_DIM;
        const bool ok = t.r0 + r < t.r1 && col < d;
        qs[x] = ok ? load_elem(q, q_row_at(dp, t, t.r0 + r) + col) : 0.f;
    }
    SimtRows c;
    const int w0 = t.r0 + warp * RPW;
    c.count = max(0, min(RPW, t.r1 - w0));
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        c.i[r] = (w0 + r) / p.group;
        c.slope[r] = alibi_slope(p, t.b, t.kv_h * p.group + (w0 + r) % p.group);
    }
    float o[RPW][DV_LANES], m[RPW], l[RPW];
    online_softmax_init(o, m, l);
    stream_blocks(
        t.n0, t.n1,
        [&](int slot, int n) {
            const uint32_t k_off = slot * STAGE_BYTES, v_off = k_off + BLOCK_N * ROW_STRIDE;
            load_cache_rows<BLOCK_N, CHUNKS, THREADS>(dp, smem, base, k_off, (const elem_t*)p.k, t.b, t.kv_h,
                                                      n * BLOCK_N, t.k_len, d, vec);
            load_cache_rows<BLOCK_N, CHUNKS, THREADS>(dp, smem, base, v_off, (const elem_t*)p.v, t.b, t.kv_h,
                                                      n * BLOCK_N, t.k_len, dv, vec);
        },
        [&](int slot, int n) {
            if (c.count > 0)
                attend_block(p, t, c, smem + slot * STAGE_BYTES, qs + warp * RPW * HEAD_DIM, n * BLOCK_N, o, m, l);
        });
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        if (r >= c.count) break;
        const float inv = l[r] != 0.f ? 1.f / l[r] : 0.f;  // NaN stays NaN
        const float lse = l[r] != 0.f ? m[r] + __logf(l[r]) : NEG_INF;
#pragma unroll
        for (int x2 = 0; x2 < DV_LANES; ++x2) {
            const int col = lane + 32 * x2;
            if (col < dv) store_row(dp, t, w0 + r, col, o[r][x2] * inv, col == 0, lse);
        }
    }
}
