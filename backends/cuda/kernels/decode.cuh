// Decode against a KV cache (FlashAttention's flash_attn_with_kvcache), shared by its kernels:
// the parameter block, cache addressing (contiguous with batch_idx, or paged through the block
// table, any page size), the packed query rows of one KV head, the split of the keys into
// chunks, the cp.async copy of a block of cache rows, and the store of a row's result (final,
// or a split's partial for the combine kernel).
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, ptx.cuh. Must match
// `DecodeParams` in src/params.rs (checked at compile time).

// Most splits of one (batch, KV head); the combine kernel keeps one weight per split per lane.
#define MAX_SPLITS 128

struct DecodeParams {
    Params attn;            // q (rotated copy when rotary), k / v = the caches, out, lse, alibi, mask, scale
    const void* k_new;      // [batch, seqlen_new, heads_kv, head_dim]
    const void* v_new;      // [batch, seqlen_new, heads_kv, head_dim_v]
    const void* q_in;       // q as given (the append kernel rotates it into attn.q)
    const int* seqlens;     // [batch]: rows in use before this call's append
    const int* block_table; // [batch, max_blocks]; null: contiguous
    const int* batch_idx;   // contiguous: [batch] cache slot per entry; null: b
    const float* rot_cos;   // [rows, rot_dim / 2]
    const float* rot_sin;
    float* part_out;        // [num_splits, batch * seqlen_q * heads_q, head_dim_v]
    float* part_lse;        // [num_splits, batch * seqlen_q * heads_q]
    int seqlen_new;
    int seqlen_cache;       // contiguous: rows per cache slot
    int page_size;          // paged: rows per page (0: contiguous)
    int max_blocks;
    int rot_dim;            // 0: no rotary
    int rot_interleaved;
    int rot_span;           // > 0: cos/sin row of (b, pos) is b * rot_span + pos - seqlens[b]; 0: pos
    int positional_q;       // causal or windowed: q row i rotates at seqlens[b] + i, else at seqlens[b]
    int num_splits;
    int rows;               // packed rows of one KV head: seqlen_q * group (row r: query r / group, head r % group)
    int row_blocks;         // CTAs along the packed rows
    int append_b0;          // the append launch writes batch entries append_b0 .. + append_batches
    int append_batches;
    int rotate_q;           // the append launch also writes the rotated q
};

// Buffer row of position `pos` of batch entry `b` (core: KvCache::row).
DEV uint64_t cache_row(const DecodeParams& dp, int b, int pos) {
    if (dp.page_size > 0) {
        const int page = dp.block_table[b * dp.max_blocks + pos / dp.page_size];
        return (uint64_t)page * dp.page_size + pos % dp.page_size;
    }
    const int slot = dp.batch_idx ? dp.batch_idx[b] : b;
    return (uint64_t)slot * dp.seqlen_cache + pos;
}

// The cos / sin row of position `pos` of batch entry `b`.
DEV int rot_row(const DecodeParams& dp, int b, int pos) {
    return dp.rot_span > 0 ? b * dp.rot_span + pos - dp.seqlens[b] : pos;
}

// One CTA's work: (batch, KV head, split of the keys, block of packed rows); the rows of one
// split and KV head are adjacent in launch order, so they share K/V through L2.
struct DecodeTile {
    int b, kv_h, split, r0, r1;  // packed rows [r0, r1)
    int q_len, k_len;
    int n0, n1;                  // this split's key blocks
    int full_lo, full_hi;        // keys every row of the tile sees
};

DEV DecodeTile decode_tile_of(const DecodeParams& dp, int block_rows, int block_n) {
    const Params& p = dp.attn;
    DecodeTile t;
    int x = blockIdx.x;
    const int rb = x % dp.row_blocks;
    x /= dp.row_blocks;
    t.split = x % dp.num_splits;
    x /= dp.num_splits;
    t.kv_h = x % p.heads_kv;
    t.b = x / p.heads_kv;
    t.r0 = rb * block_rows;
    t.r1 = min(t.r0 + block_rows, dp.rows);
    t.q_len = p.seqlen_q;
    t.k_len = dp.seqlens[t.b] + dp.seqlen_new;
    // Query rows of the tile: i0 .. i1 - 1 (packed rows of one query are adjacent).
    const int i0 = t.r0 / p.group, i1 = (t.r1 - 1) / p.group + 1;
    int n_lo, n_hi, tmp;
    mask_key_blocks(p, i0, i1, t.q_len, t.k_len, block_n, n_lo, n_hi);
    mask_keys(p, i1 - 1, t.q_len, t.k_len, t.full_lo, tmp);
    mask_keys(p, i0, t.q_len, t.k_len, tmp, t.full_hi);
    const int per_split = (n_hi - n_lo + dp.num_splits - 1) / dp.num_splits;
    t.n0 = min(n_lo + t.split * per_split, n_hi);
    t.n1 = min(t.n0 + per_split, n_hi);
    return t;
}

// Output row (= LSE row of the partials) of packed row r: ((b * seqlen_q + i) * heads_q + h).
DEV int out_row(const DecodeParams& dp, const DecodeTile& t, int r) {
    const Params& p = dp.attn;
    const int i = r / p.group, h = t.kv_h * p.group + r % p.group;
    return (t.b * p.seqlen_q + i) * p.heads_q + h;
}

// Element offset of packed row r's q (query r / group, head kv_h group + r % group): the
// caller's q through its strides, or the rotated copy (contiguous, like out) when the append
// kernel wrote one.
DEV uint64_t q_row_at(const DecodeParams& dp, const DecodeTile& t, int r) {
    const Params& p = dp.attn;
    if (p.q != dp.q_in) return (uint64_t)out_row(dp, t, r) * p.head_dim;
    const int i = r / p.group, h = t.kv_h * p.group + r % p.group;
    return strided_row(p, p.q_strides, t.b, t.b * p.seqlen_q, i, h);
}

// Whether q's rows go by 16-byte copies: the rotated copy always, the caller's q when its
// strides allow.
DEV bool q_rows_16b(const DecodeParams& dp) {
    return dp.attn.q != dp.q_in || (stride_bits(dp.attn.q_strides) & 7) == 0;
}

// Stores column `col` of packed row r: o (already normalised) and, with `lse_too`, the row's
// LSE (natural log; -inf for a row that saw no key, NaN stays NaN). One split: the final
// output (out in the dtype, lse); several: the split's partial (f32) for the combine kernel.
DEV void store_row(const DecodeParams& dp, const DecodeTile& t, int r, int col, float o, bool lse_too, float lse) {
    const Params& p = dp.attn;
    const int row = out_row(dp, t, r);
    if (dp.num_splits == 1) {
        store_elem((elem_t*)p.out, (uint64_t)row * p.head_dim_v + col, o);
        if (lse_too && p.lse) {
            const int i = r / p.group, h = t.kv_h * p.group + r % p.group;
            p.lse[((uint64_t)t.b * p.heads_q + h) * p.seqlen_q + i] = lse;
        }
    } else {
        const uint64_t part = (uint64_t)t.split * p.batch * p.seqlen_q * p.heads_q + row;
        dp.part_out[part * p.head_dim_v + col] = o;
        if (lse_too) dp.part_lse[part] = lse;
    }
}

// A tile with no key to see (an empty split, or rows the mask hides from every key): out 0,
// LSE -inf for each of its rows.
DEV void store_empty(const DecodeParams& dp, const DecodeTile& t) {
    const int dv = dp.attn.head_dim_v, n = (t.r1 - t.r0) * dv;
    for (int x = threadIdx.x; x < n; x += blockDim.x)
        store_row(dp, t, t.r0 + x / dv, x % dv, 0.f, x % dv == 0, NEG_INF);
}

// Stores an empty tile (store_empty) and says so: the split kernels return at once on it.
DEV bool stored_if_empty(const DecodeParams& dp, const DecodeTile& t) {
    if (t.n0 < t.n1) return false;
    store_empty(dp, t);
    return true;
}

// Shared-memory byte offset of 16-byte chunk c of row r of a tile (each kernel defines it).
DEV uint32_t tile_offset(int r, int c);

// Copies the rows of keys j0 .. j0 + ROWS of (b, kv_h) from `cache` (head dim `cols`) into the
// tile at shared offset `dst`; keys from k_len on and columns from `cols` on become zeros.
// vec: whole 16-byte chunks through cp.async (the caller commits and waits), COPY_TPR threads
// per row (128 contiguous bytes, coalesced); else element by element. CHUNKS: 16-byte chunks
// per tile row.
template <int ROWS, int CHUNKS, int THREADS>
DEV void load_cache_rows(const DecodeParams& dp, uint8_t* smem, uint32_t smem_base, uint32_t dst, const elem_t* cache,
                         int b, int kv_h, int j0, int k_len, int cols, bool vec) {
    constexpr int EPC = 16 / (int)sizeof(elem_t);  // elements per chunk
    constexpr int TPR = CHUNKS % 8 == 0 ? 8 : 4;
    constexpr int SWEEP = THREADS / TPR;
    static_assert(CHUNKS % TPR == 0, "whole chunks per copying thread");
    const int heads_kv = dp.attn.heads_kv;
    if (vec) {
        const int c0 = threadIdx.x % TPR;
        for (int r = threadIdx.x / TPR; r < ROWS; r += SWEEP) {
            const int j = j0 + r;
            const bool ok_row = j < k_len;
            const elem_t* row = ok_row ? cache + (cache_row(dp, b, j) * heads_kv + kv_h) * cols : cache;
#pragma unroll
            for (int cc = 0; cc < CHUNKS / TPR; ++cc) {
                const int c = c0 + cc * TPR;
                const bool ok = ok_row && c * EPC < cols;
                cp_async_16(smem_base + dst + tile_offset(r, c), ok ? row + c * EPC : cache, ok);
            }
        }
    } else {
        for (int x = threadIdx.x; x < ROWS * CHUNKS * EPC; x += THREADS) {
            const int r = x / (CHUNKS * EPC), col = x % (CHUNKS * EPC);
            const int j = j0 + r;
            elem_t val = 0;
            if (j < k_len && col < cols) val = cache[(cache_row(dp, b, j) * heads_kv + kv_h) * cols + col];
            *(elem_t*)(smem + dst + tile_offset(r, col / EPC) + (col % EPC) * sizeof(elem_t)) = val;
        }
    }
}

// The cp.async ring of STAGES stages over key blocks n0 .. n1: block n0 + k lands in stage
// k % STAGES; load(slot, n) queues block n's copies, compute(slot, n) consumes them (what the
// caller queued before the call lands with the first block). Returns with every copy landed
// and every thread past its last compute (the stages are free again).
template <class Load, class Compute>
DEV void stream_blocks(int n0, int n1, Load load, Compute compute) {
#if STAGES > 1
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (n0 + s < n1) load(s, n0 + s);
        cp_async_commit();
    }
    for (int n = n0; n < n1; ++n) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // block n is in for every thread; every warp is done with block n - 1
        const int next = n + STAGES - 1;
        if (next < n1) load((next - n0) % STAGES, next);
        cp_async_commit();
        compute((n - n0) % STAGES, n);
    }
#else
    for (int n = n0; n < n1; ++n) {
        load(0, n);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        compute(0, n);
        __syncthreads();  // every warp is done with the stage before it is refilled
    }
#endif
    cp_async_wait<0>();
    __syncthreads();
}
