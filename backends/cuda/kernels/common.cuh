// Shared by every flashattn CUDA kernel: fixed-width types (the kernels include no headers, so
// NVRTC needs no CUDA include path), the launch parameters and the mask arithmetic.
// Semantics follow docs/ARCHITECTURE.md: causal is bottom-right aligned, window (left, right)
// with -1 unbounded, fully masked rows give out = 0 and LSE = -inf.

typedef unsigned long long uint64_t;
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned char uint8_t;

#define DEV __device__ __forceinline__
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define NEG_INF (-__int_as_float(0x7f800000))

// Must match `KernelParams` in src/launch.rs field for field.
struct Params {
    void* out;               // [tokens_q, heads_q, head_dim_v], input dtype (bf16 for fp8)
    float* lse;              // dense [batch, heads_q, seqlen_q]; varlen [heads_q, total_q]; may be null
    const int* cu_seqlens_q; // varlen: [batch + 1]; null when dense
    const int* cu_seqlens_k;
    const float* alibi;      // [heads_q] or [batch, heads_q]; null when off
    const void* q;           // plain pointers, for the kernels that do not use tensor maps
    const void* k;
    const void* v;
    int batch, heads_q, heads_kv, group;
    int seqlen_q, seqlen_k;  // dense: per sequence; varlen: total tokens
    int head_dim, head_dim_v;
    int num_m_blocks;        // query blocks of the longest sequence
    int total_tiles;         // num_m_blocks * heads_q * batch
    int win_left, win_right; // causal already folded in (right = 0); -1 unbounded
    int alibi_per_batch;
    int head_major_tiles;    // Hopper tile order, see decode_tile in hopper_fwd.cu
    float scale;             // softmax scale
    float softcap;           // 0 = off
};

struct SeqInfo {
    int q_start, q_len, k_start, k_len;
};

DEV SeqInfo seq_info(const Params& p, int b) {
    SeqInfo s;
    if (p.cu_seqlens_q) {
        s.q_start = p.cu_seqlens_q[b];
        s.q_len = p.cu_seqlens_q[b + 1] - s.q_start;
        s.k_start = p.cu_seqlens_k[b];
        s.k_len = p.cu_seqlens_k[b + 1] - s.k_start;
    } else {
        s.q_start = b * p.seqlen_q;
        s.q_len = p.seqlen_q;
        s.k_start = b * p.seqlen_k;
        s.k_len = p.seqlen_k;
    }
    return s;
}

// Visible keys [lo, hi) of query row i (same rule as AttentionSpec::key_range).
DEV void key_range(const Params& p, int i, int q_len, int k_len, int& lo, int& hi) {
    int diag = i + k_len - q_len;
    lo = p.win_left >= 0 ? max(diag - p.win_left, 0) : 0;
    hi = p.win_right >= 0 ? min(max(diag + p.win_right + 1, 0), k_len) : k_len;
    lo = min(lo, k_len);
}

// Key blocks of size bn that rows [m0, m1) can see: [n_lo, n_hi). lo and hi grow with i.
DEV void block_range(const Params& p, int m0, int m1, int q_len, int k_len, int bn, int& n_lo, int& n_hi) {
    int lo0, hi0, lo1, hi1;
    key_range(p, m0, q_len, k_len, lo0, hi0);
    key_range(p, m1 - 1, q_len, k_len, lo1, hi1);
    n_lo = lo0 / bn;
    n_hi = hi1 > lo0 ? (hi1 + bn - 1) / bn : n_lo;
}

DEV float alibi_slope(const Params& p, int b, int h) {
    if (!p.alibi) return 0.f;
    return p.alibi_per_batch ? p.alibi[b * p.heads_q + h] : p.alibi[h];
}

// Score after scale, softcap and ALiBi, in natural-log units.
DEV float score_mod(const Params& p, float dot, float slope, int i, int j, int q_len, int k_len) {
    float x = dot * p.scale;
    if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
    if (slope != 0.f) x -= slope * fabsf((float)(i + k_len - q_len - j));
    return x;
}

DEV uint64_t lse_index(const Params& p, int b, int h, int q_start, int i) {
    if (p.cu_seqlens_q) return (uint64_t)h * p.seqlen_q + q_start + i;
    return ((uint64_t)b * p.heads_q + h) * p.seqlen_q + i;
}

// 16-bit float conversions through PTX (no cuda_fp16.h / cuda_bf16.h).
DEV float bf16_to_f32(uint16_t x) { return __uint_as_float(((uint32_t)x) << 16); }
DEV float f16_to_f32(uint16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
DEV uint16_t f32_to_bf16(float f) {
    uint16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
DEV uint16_t f32_to_f16(float f) {
    uint16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
// Packs (lo, hi) into one register: lo in the low half (the lower column index).
DEV uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
DEV uint32_t pack_f16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Element type of q, k, v and out: FA_DTYPE 0 = f32, 1 = f16, 2 = bf16.
#if FA_DTYPE == 0
typedef float elem_t;
DEV float load_elem(const elem_t* p, uint64_t i) { return p[i]; }
DEV void store_elem(elem_t* p, uint64_t i, float x) { p[i] = x; }
#else
typedef uint16_t elem_t;
DEV float load_elem(const elem_t* p, uint64_t i) {
#if FA_DTYPE == 1
    return f16_to_f32(p[i]);
#else
    return bf16_to_f32(p[i]);
#endif
}
DEV void store_elem(elem_t* p, uint64_t i, float x) {
#if FA_DTYPE == 1
    p[i] = f32_to_f16(x);
#else
    p[i] = f32_to_bf16(x);
#endif
}
#endif
