// The append step of a decode call: the new k / v rows of batch entries append_b0 ..
// + append_batches are written into the cache at rows seqlens[b] .. (through the block table
// when paged), k rotated at positions seqlens[b] + t; with rotary, q is rotated into attn.q
// (FlashAttention's rule: row i at seqlens[b] + i when causal or windowed, else at
// seqlens[b]). Rotation: pairs (2i, 2i + 1) (interleaved, GPT-J) or (i, i + rot_dim / 2)
// (GPT-NeoX); x' = x cos - y sin, y' = x sin + y cos, in f32. Rows without rotation are copied
// bit for bit. Two entries that write the same cache row are launched one at a time by the
// host, in batch order (the later one's row stays, as in the reference).
// Prepended: params.cuh, dtype.cuh, decode.cuh.

// Element x of a head of `n` values at src (rotated at cos / sin row `rr` when x < rot_dim).
DEV float rotated(const DecodeParams& dp, const elem_t* src, int x, int rr) {
    const float self = load_elem(src, x);
    if (x >= dp.rot_dim) return self;
    const int half = dp.rot_dim / 2;
    int i, partner;
    bool first;
    if (dp.rot_interleaved) {
        i = x / 2;
        first = x % 2 == 0;
        partner = x ^ 1;
    } else {
        first = x < half;
        i = first ? x : x - half;
        partner = first ? x + half : x - half;
    }
    const float c = dp.rot_cos[(uint64_t)rr * half + i], s = dp.rot_sin[(uint64_t)rr * half + i];
    const float other = load_elem(src, partner);
    // first: a' = a c - b s (a = self); second: b' = a s + b c (b = self).
    return first ? self * c - other * s : other * s + self * c;
}

// grid: append_batches * seqlen_new CTAs for the new rows, then (rotate_q) batch * seqlen_q
// CTAs for the q rows; block: any multiple of 32 threads.
extern "C" __global__ void fa_decode_append(const __grid_constant__ DecodeParams dp) {
    const Params& p = dp.attn;
    const int new_rows = dp.append_batches * dp.seqlen_new;
    const int d = p.head_dim, dv = p.head_dim_v;
    if ((int)blockIdx.x < new_rows) {
        const int b = dp.append_b0 + blockIdx.x / dp.seqlen_new, t = blockIdx.x % dp.seqlen_new;
        const int pos = dp.seqlens[b] + t;
        const uint64_t src = (uint64_t)(b * dp.seqlen_new + t) * p.heads_kv;
        const uint64_t dst = cache_row(dp, b, pos) * p.heads_kv;
        const elem_t* kn = (const elem_t*)dp.k_new;
        const elem_t* vn = (const elem_t*)dp.v_new;
        elem_t* kc = (elem_t*)p.k;
        elem_t* vc = (elem_t*)p.v;
        const int rr = dp.rot_dim > 0 ? rot_row(dp, b, pos) : 0;
        for (int e = threadIdx.x; e < p.heads_kv * d; e += blockDim.x) {
            if (dp.rot_dim > 0) {
                const int h = e / d, x = e % d;
                store_elem(kc, (dst + h) * d + x, rotated(dp, kn + (src + h) * d, x, rr));
            } else {
                kc[dst * d + e] = kn[src * d + e];
            }
        }
        for (int e = threadIdx.x; e < p.heads_kv * dv; e += blockDim.x) vc[dst * dv + e] = vn[src * dv + e];
        return;
    }
    // A q row: (b, i), every query head.
    const int qi = blockIdx.x - new_rows;
    const int b = qi / p.seqlen_q, i = qi % p.seqlen_q;
    const int rr = rot_row(dp, b, dp.seqlens[b] + (dp.positional_q ? i : 0));
    const uint64_t row = (uint64_t)qi * p.heads_q;
    const elem_t* q = (const elem_t*)dp.q_in;  // the caller's, through q_strides
    elem_t* out = (elem_t*)p.q;                // the rotated copy: contiguous
    for (int e = threadIdx.x; e < p.heads_q * d; e += blockDim.x) {
        const int h = e / d, x = e % d;
        const uint64_t at = strided_row(p, p.q_strides, b, b * p.seqlen_q, i, h);
        store_elem(out, (row + h) * d + x, rotated(dp, q + at, x, rr));
    }
}
