// Warp reductions, and the online-softmax step of the CUDA-core kernels that give each lane
// one key of a 32-key block (generic_fwd.cu, decode_simt.cu); the backward's row sums use
// warp_sum. Prepended after params.cuh (DEV, NEG_INF).

DEV float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}
DEV float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

// The online-softmax state of R rows before their first key: max -inf, sum 0, output 0.
template <int R, int C>
DEV void online_softmax_init(float (&o)[R][C], float (&m)[R], float (&l)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int x = 0; x < C; ++x) o[r][x] = 0.f;
    }
}

// Folds one key block into a row's running max m and sum l: lane j holds key j's score x
// (NEG_INF where masked). False while the row has seen no visible key (nothing changes); else
// pj is this lane's weight and corr the factor the row's output is scaled by before P V is
// added. fmaxf skips NaN, but a NaN score makes pj and so l NaN: the row's out and LSE become
// NaN, as FlashAttention's and the reference's do.
DEV bool online_softmax_step(float x, float& m, float& l, float& pj, float& corr) {
    const float mx = fmaxf(m, warp_max(x));
    const float m_use = mx == NEG_INF ? 0.f : mx;
    pj = __expf(x - m_use);
    const float psum = warp_sum(pj);
    if (psum == 0.f && l == 0.f) return false;  // nothing visible yet
    corr = __expf(m - m_use);
    l = l * corr + psum;
    m = mx;
    return true;
}
