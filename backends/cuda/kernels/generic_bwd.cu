// Portable FlashAttention backward on CUDA cores, for f32 (and f16 / bf16 on GPUs before sm_80):
// every shape the spec allows, every mask and score mod, varlen. Correct and simple rather than
// fast, like generic_fwd.cu. Two kernels:
//   fa_generic_bwd: a warp owns KEYS_PER_WARP keys of one kv head (lanes own head-dim columns
//     lane, lane + 32, ...; k, v, dK, dV in registers) and walks the query rows that see them,
//     for every query head of the kv head in order: s = q.k and dp = dO.v by warp sums, then
//     dV += P dO, dK += dS q, and dQ += dS k by f32 atomicAdd into dq_accum (unless it is null:
//     deterministic);
//   fa_generic_bwd_dq: a warp per query row sums dQ over its visible keys in order
//     (deterministic), written once in the input dtype.
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, bwd.cuh.
// Compile-time (src/backward/tiles.rs GenericBwdTiles): FA_DTYPE, NUM_WARPS, KEYS_PER_WARP,
// MAX_HEAD_DIM.

#if !defined(NUM_WARPS) || !defined(KEYS_PER_WARP) || !defined(MAX_HEAD_DIM)
#error "the generic backward's tile constants come from src/variants.rs"
#endif
#define COLS (MAX_HEAD_DIM / 32)  // head-dim columns per lane

// The row at element `at` of a strided input (strided_row) as this lane's columns (0 past dim),
// in f32.
DEV void load_lane_row(float (&x)[COLS], const elem_t* t, uint64_t at, int dim, int lane) {
#pragma unroll
    for (int c = 0; c < COLS; ++c) x[c] = lane + 32 * c < dim ? load_elem(t, at + lane + 32 * c) : 0.f;
}

DEV float lane_dot(const float (&a)[COLS], const float (&b)[COLS]) {
    float acc = 0.f;
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc += a[c] * b[c];
    return warp_sum(acc);
}

DEV void store_lane_row(elem_t* t, uint64_t row, int dim, int lane, const float (&x)[COLS], float mul) {
#pragma unroll
    for (int c = 0; c < COLS; ++c)
        if (lane + 32 * c < dim) store_elem(t, row * dim + lane + 32 * c, x[c] * mul);
}

// grid: (ceil(longest k_len / (NUM_WARPS KEYS_PER_WARP)), heads_kv, batch); block: 32 NUM_WARPS.
extern "C" __global__ void __launch_bounds__(NUM_WARPS * 32)
    fa_generic_bwd(const Params p, const elem_t* dout, const float* delta, float* dq_accum, elem_t* dk, elem_t* dv) {
    const int b = blockIdx.z, kv_h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const SeqBounds s = seq_bounds(p, b);
    const int j0 = (blockIdx.x * NUM_WARPS + warp) * KEYS_PER_WARP;
    if (j0 >= s.k_len) return;  // whole warps: no barrier in this kernel
    const int d = p.head_dim, dvd = p.head_dim_v, nk = min(KEYS_PER_WARP, s.k_len - j0);
    float k[KEYS_PER_WARP][COLS], v[KEYS_PER_WARP][COLS], dk_acc[KEYS_PER_WARP][COLS], dv_acc[KEYS_PER_WARP][COLS];
    int lo[KEYS_PER_WARP], hi[KEYS_PER_WARP];
#pragma unroll
    for (int x = 0; x < KEYS_PER_WARP; ++x) {
        const int j = min(j0 + x, s.k_len - 1);
        load_lane_row(k[x], (const elem_t*)p.k, strided_row(p, p.k_strides, b, s.k_start, j, kv_h), d, lane);
        load_lane_row(v[x], (const elem_t*)p.v, strided_row(p, p.v_strides, b, s.k_start, j, kv_h), dvd, lane);
        mask_rows(p, j0 + x < s.k_len ? j0 + x : s.k_len, s.q_len, s.k_len, lo[x], hi[x]);
#pragma unroll
        for (int c = 0; c < COLS; ++c) dk_acc[x][c] = dv_acc[x][c] = 0.f;
    }
    // Rows that see any of the warp's keys: both ends grow with the key.
    int r_lo = s.q_len, r_hi = 0;
#pragma unroll
    for (int x = 0; x < KEYS_PER_WARP; ++x)
        if (lo[x] < hi[x]) {
            r_lo = min(r_lo, lo[x]);
            r_hi = max(r_hi, hi[x]);
        }
    for (int h = kv_h * p.group; h < (kv_h + 1) * p.group; ++h) {
        const GradCtx c = grad_ctx(p, s, b, h);
        for (int i = r_lo; i < r_hi; ++i) {
            const uint64_t row = (uint64_t)(s.q_start + i) * p.heads_q + h, at = lse_index(p, b, h, s.q_start, i);
            float q[COLS], o[COLS], dq[COLS];
            load_lane_row(q, (const elem_t*)p.q, strided_row(p, p.q_strides, b, s.q_start, i, h), d, lane);
            load_lane_row(o, dout, strided_row(p, p.do_strides, b, s.q_start, i, h), dvd, lane);
            const float lse2 = lse_log2(p.lse[at]), dl = delta[at];
#pragma unroll
            for (int cc = 0; cc < COLS; ++cc) dq[cc] = 0.f;
#pragma unroll
            for (int x = 0; x < KEYS_PER_WARP; ++x) {
                if (i < lo[x] || i >= hi[x]) continue;  // uniform across the warp
                float pr, ds;
                grad_of_score(c, lane_dot(q, k[x]), lane_dot(o, v[x]), i, j0 + x, lse2, dl, pr, ds);
#pragma unroll
                for (int cc = 0; cc < COLS; ++cc) {
                    dv_acc[x][cc] += pr * o[cc];
                    dk_acc[x][cc] += ds * q[cc];
                    dq[cc] += ds * k[x][cc];
                }
            }
            if (dq_accum)
#pragma unroll
                for (int cc = 0; cc < COLS; ++cc)
                    if (lane + 32 * cc < d) atomicAdd(dq_accum + row * d + lane + 32 * cc, dq[cc]);
        }
    }
    for (int x = 0; x < nk; ++x) {
        const uint64_t row = (uint64_t)(s.k_start + j0 + x) * p.heads_kv + kv_h;
        store_lane_row(dk, row, d, lane, dk_acc[x], p.scale);
        store_lane_row(dv, row, dvd, lane, dv_acc[x], 1.f);
    }
}

// grid: (ceil(longest q_len / NUM_WARPS), heads_q, batch); block: 32 NUM_WARPS.
extern "C" __global__ void __launch_bounds__(NUM_WARPS * 32)
    fa_generic_bwd_dq(const Params p, const elem_t* dout, const float* delta, elem_t* dq) {
    const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const SeqBounds s = seq_bounds(p, b);
    const int i = blockIdx.x * NUM_WARPS + warp;
    if (i >= s.q_len) return;
    const int d = p.head_dim, dvd = p.head_dim_v, kv_h = h / p.group;
    const GradCtx c = grad_ctx(p, s, b, h);
    const uint64_t row = (uint64_t)(s.q_start + i) * p.heads_q + h, at = lse_index(p, b, h, s.q_start, i);
    float q[COLS], o[COLS], acc[COLS], kr[COLS], vr[COLS];
    load_lane_row(q, (const elem_t*)p.q, strided_row(p, p.q_strides, b, s.q_start, i, h), d, lane);
    load_lane_row(o, dout, strided_row(p, p.do_strides, b, s.q_start, i, h), dvd, lane);
    const float lse2 = lse_log2(p.lse[at]), dl = delta[at];
#pragma unroll
    for (int cc = 0; cc < COLS; ++cc) acc[cc] = 0.f;
    int lo, hi;
    mask_keys(p, i, s.q_len, s.k_len, lo, hi);
    for (int j = lo; j < hi; ++j) {
        load_lane_row(kr, (const elem_t*)p.k, strided_row(p, p.k_strides, b, s.k_start, j, kv_h), d, lane);
        load_lane_row(vr, (const elem_t*)p.v, strided_row(p, p.v_strides, b, s.k_start, j, kv_h), dvd, lane);
        float pr, ds;
        grad_of_score(c, lane_dot(q, kr), lane_dot(o, vr), i, j, lse2, dl, pr, ds);
#pragma unroll
        for (int cc = 0; cc < COLS; ++cc) acc[cc] += ds * kr[cc];
    }
    store_lane_row(dq, row, d, lane, acc, p.scale);
}
