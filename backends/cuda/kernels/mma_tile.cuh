// Shared-memory tiles and warp-level matrix products on mma.sync m16n8k16 (sm_80+): swizzled
// tiles of 16-bit rows and cp.async block copies (the forward's and the backward's), and the
// three operand shapes FlashAttention-2's backward needs (A and B^T from shared memory; A in
// registers, B from shared memory; A from shared memory, plain or transposed). Fragment
// layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16" (g = lane / 4, t = lane % 4; an
// accumulator tile holds rows g and g + 8, columns 2t and 2t + 1). Prepended: params.cuh,
// dtype.cuh, ptx.cuh.

#if FA_DTYPE == 2
#define PACK2 pack_bf16x2
#else
#define PACK2 pack_f16x2
#endif

// Byte offset of 16-byte chunk c of row r in a tile of ROW_BYTES-byte rows, XOR-swizzled so that
// the 8 rows one ldmatrix matrix reads at one chunk column, and 8 chunks of a row, fall in 8
// different 16-byte bank groups: rows of 128-byte multiples swap chunks by r % 8; 64-byte rows
// (two per 128-byte bank window) by (r / 2) % 4; 32-byte rows by (r / 4) % 2.
template <int ROW_BYTES>
DEV uint32_t swz(int r, int c) {
    static_assert(ROW_BYTES % 32 == 0, "rows of whole 32-byte pairs of chunks");
    if constexpr (ROW_BYTES % 128 == 0) return r * ROW_BYTES + ((c ^ (r & 7)) << 4);
    else if constexpr (ROW_BYTES % 64 == 0) return r * ROW_BYTES + ((c ^ ((r >> 1) & 3)) << 4);
    else return r * ROW_BYTES + ((c ^ ((r >> 2) & 1)) << 4);
}

// Copies ROWS rows of a block (row r at src + r * stride elements) into the tile at shared offset
// `dst` (rows of COLS 16-bit values); rows from `rows` on and columns from `cols` on become zeros
// (past a sequence's end, past the real head dim). vec: cols and stride are multiples of 8, so
// whole 16-byte chunks go through cp.async (the caller commits and waits); else one element at a
// time. TPR threads share a row (coalesced), each keeping its chunk column across the sweep.
template <int ROWS, int COLS, int THREADS>
DEV void load_rows(uint8_t* smem, uint32_t smem_base, uint32_t dst, const elem_t* src, uint64_t stride, int rows,
                   int cols, bool vec) {
    constexpr int CH = COLS / 8, TPR = CH % 8 == 0 ? 8 : 4, SWEEP = THREADS / TPR;
    static_assert(COLS % 32 == 0 && ROWS % SWEEP == 0, "a block is a whole number of copy sweeps");
    if (vec) {
        const int c0 = threadIdx.x % TPR, r0 = threadIdx.x / TPR;
#pragma unroll
        for (int rr = 0; rr < ROWS / SWEEP; ++rr) {
            const int r = r0 + rr * SWEEP;
            const elem_t* row = src + r * stride;
#pragma unroll
            for (int cc = 0; cc < CH / TPR; ++cc) {
                const int c = c0 + cc * TPR;
                const bool ok = r < rows && c * 8 < cols;
                cp_async_16(smem_base + dst + swz<COLS * 2>(r, c), ok ? row + c * 8 : src, ok);
            }
        }
    } else {
        for (int x = threadIdx.x; x < ROWS * COLS; x += THREADS) {
            const int r = x / COLS, col = x % COLS;
            const uint16_t val = r < rows && col < cols ? src[r * stride + col] : (uint16_t)0;
            *(uint16_t*)(smem + dst + swz<COLS * 2>(r, col / 8) + (col % 8) * 2) = val;
        }
    }
}

// acc[MT][NT] += A B^T: A's 16-row tiles from rows a_row0 + 16 mt of one tile, B's 8-row tiles
// from rows b_row0 + 8 nt of another, both stored [row][k] (rows of RB bytes); k-steps of 16
// up to k_steps (the real contraction length, rounded up to 16).
template <int MT, int NT, int RB>
DEV void mma_abt(float (&acc)[MT][NT][4], uint32_t a_tile, int a_row0, uint32_t b_tile, int b_row0, int lane,
                 int k_steps) {
    static_assert(NT % 2 == 0, "B tiles come in pairs (ldmatrix x4)");
#pragma unroll
    for (int kk = 0; kk < RB / 32; ++kk) {
        if (kk >= k_steps) break;
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            ldmatrix_x4(a[mt], a_tile + swz<RB>(a_row0 + mt * 16 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, b_tile + swz<RB>(b_row0 + np * 16 + ((lane >> 4) << 3) + (lane & 7), 2 * kk + ((lane >> 3) & 1)));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma_16816(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// The accumulators of a 16 x (16 KS) tile, packed to 16-bit pairs as the A fragments of KS k-steps
// (two 8-column accumulator tiles make one 16-wide k-step).
template <int KS>
DEV void pack_a(uint32_t (&a)[KS][4], const float (&acc)[2 * KS][4]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        a[kk][0] = PACK2(acc[2 * kk][0], acc[2 * kk][1]);
        a[kk][1] = PACK2(acc[2 * kk][2], acc[2 * kk][3]);
        a[kk][2] = PACK2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
        a[kk][3] = PACK2(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
    }
}

// B fragments of an 8-column pair (columns col0.., chunk col0 / 8) at k-step kk of a tile stored
// [k][n] (rows b_k0 + k), transposed by ldmatrix: b[0], b[1] for the first 8 columns, b[2], b[3]
// for the next.
template <int RB>
DEV void load_b_kn(uint32_t (&b)[4], uint32_t b_tile, int b_k0, int kk, int col0, int lane) {
    ldmatrix_x4_trans(b, b_tile + swz<RB>(b_k0 + kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7), col0 / 8 + (lane >> 4)));
}

// acc[NT] += A B for A in registers (KS k-steps of one 16-row tile) and B stored [k][n] (rows
// b_k0 + k), output columns col0 + 8 nt, for the first n_pairs pairs of 8-column tiles.
template <int KS, int NT, int RB>
DEV void mma_ab_regs(float (&acc)[NT][4], const uint32_t (&a)[KS][4], uint32_t b_tile, int b_k0, int col0, int lane,
                     int n_pairs) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            if (np >= n_pairs) break;
            uint32_t b[4];
            load_b_kn<RB>(b, b_tile, b_k0, kk, col0 + 16 * np, lane);
            mma_16816(acc[2 * np], a[kk], b[0], b[1]);
            mma_16816(acc[2 * np + 1], a[kk], b[2], b[3]);
        }
    }
}

// acc[NT] += A B for a 16-row tile of A in shared memory (rows a_row0..; A_TRANS: stored [k][row]
// instead of [row][k]) and B stored [k][n], KS k-steps from k = 0, output columns col0 + 8 nt.
template <int KS, int NT, int A_RB, int B_RB, bool A_TRANS>
DEV void mma_ab_smem(float (&acc)[NT][4], uint32_t a_tile, int a_row0, uint32_t b_tile, int col0, int lane,
                     int n_pairs) {
// Not unrolled for A stored [row][k] (dV, dK with two warps per key tile: 128 accumulator
// registers live): unrolled, ptxas hoists the next k-steps' fragments and spills (sm_86, d256).
#pragma unroll(A_TRANS ? KS : 1)
    for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4];
        if (A_TRANS)
            ldmatrix_x4_trans(a, a_tile + swz<A_RB>(kk * 16 + (lane & 7) + ((lane >> 4) << 3), a_row0 / 8 + ((lane >> 3) & 1)));
        else
            ldmatrix_x4(a, a_tile + swz<A_RB>(a_row0 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            if (np >= n_pairs) break;
            uint32_t b[4];
            load_b_kn<B_RB>(b, b_tile, 0, kk, col0 + 16 * np, lane);
            mma_16816(acc[2 * np], a, b[0], b[1]);
            mma_16816(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// Writes a 16 x (8 NT) accumulator tile (rows row0 + g, + 8; columns col0 + 8 nt + 2t, + 1),
// times `mul`, into the 16-bit global rows `row_ptr(r)` for rows < rows and columns < cols.
template <int NT, class RowPtr>
DEV void store_acc(const float (&acc)[NT][4], RowPtr row_ptr, int row0, int col0, int rows, int cols, float mul,
                   int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + lane / 4 + 8 * r;
        if (row >= rows) continue;
        elem_t* out = row_ptr(row);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int col = col0 + nt * 8 + 2 * (lane % 4);
            if (col >= cols) break;
            const float x0 = acc[nt][2 * r] * mul, x1 = acc[nt][2 * r + 1] * mul;
            if (cols % 2 == 0) {
                *(uint32_t*)(out + col) = PACK2(x0, x1);  // 4-byte aligned: cols and col even
            } else {
                store_elem(out, col, x0);
                if (col + 1 < cols) store_elem(out, col + 1, x1);
            }
        }
    }
}
