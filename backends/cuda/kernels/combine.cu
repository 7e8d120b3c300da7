// The combine step of a split decode: each split wrote its rows' normalised partial output
// and LSE (f32); per output row, lse = log(sum_c exp(lse_c)) and out = sum_c exp(lse_c - lse)
// out_c. An empty split (lse_c = -inf) weighs 0; a row no split saw gives out 0, LSE -inf; a
// NaN partial makes the row's out and LSE NaN (the rows that saw a NaN, as the forward).
// Prepended: params.cuh, dtype.cuh, decode.cuh.

// grid: ceil(batch * seqlen_q * heads_q / 4) CTAs of 4 warps, one warp per output row.
extern "C" __global__ void fa_decode_combine(const __grid_constant__ DecodeParams dp) {
    const Params& p = dp.attn;
    const int total = p.batch * p.seqlen_q * p.heads_q;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= total) return;
    const int splits = dp.num_splits, dv = p.head_dim_v;
    // Lane l holds the LSE of splits l, l + 32, ...
    float lse_c[MAX_SPLITS / 32];
    float mx = NEG_INF;
    bool nan = false;
#pragma unroll
    for (int k = 0; k < MAX_SPLITS / 32; ++k) {
        const int c = lane + 32 * k;
        lse_c[k] = c < splits ? dp.part_lse[(uint64_t)c * total + row] : NEG_INF;
        nan |= lse_c[k] != lse_c[k];
        mx = fmaxf(mx, lse_c[k]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
        nan |= __shfl_xor_sync(0xffffffff, nan ? 1.f : 0.f, o) != 0.f;
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < MAX_SPLITS / 32; ++k) {
        lse_c[k] = mx == NEG_INF ? 0.f : __expf(lse_c[k] - mx);  // now the split's weight
        sum += lse_c[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int b = row / (p.seqlen_q * p.heads_q), h = row % p.heads_q, i = (row / p.heads_q) % p.seqlen_q;
    // Every lane runs every column step (the shuffles need the whole warp).
    for (int col0 = 0; col0 < dv; col0 += 32) {
        const int col = col0 + lane;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < MAX_SPLITS / 32; ++k) {
            if (32 * k >= splits) break;
            for (int cc = 0; cc < 32 && 32 * k + cc < splits; ++cc) {
                const float w = __shfl_sync(0xffffffff, lse_c[k], cc);
                if (w != 0.f && col < dv) acc += w * dp.part_out[((uint64_t)(32 * k + cc) * total + row) * dv + col];
            }
        }
        if (col < dv) store_elem((elem_t*)p.out, (uint64_t)row * dv + col, nan ? __int_as_float(0x7fc00000) : acc * inv);
    }
    if (lane == 0 && p.lse)
        p.lse[((uint64_t)b * p.heads_q + h) * p.seqlen_q + i] =
            nan ? __int_as_float(0x7fc00000) : (mx == NEG_INF ? NEG_INF : mx + __logf(sum));
}
