// Shared by every flashattn CUDA kernel: fixed-width types (the kernels include no headers, so
// NVRTC needs no CUDA include path), the launch parameters and a sequence's bounds.
// Semantics follow docs/ARCHITECTURE.md. src/variants.rs prepends this file (and the other
// headers a kernel needs) to the kernel's source; src/params.rs appends static_asserts that
// check `Params` against the Rust struct, member by member.

typedef unsigned long long uint64_t;
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned char uint8_t;

#define DEV __device__ __forceinline__
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define NEG_INF (-__int_as_float(0x7f800000))

// Must match `KernelParams` in src/params.rs field for field (checked at compile time).
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
    int head_major_tiles;    // tile order, see decode_tile in tiles.cuh
    float scale;             // softmax scale
    float softcap;           // 0 = off
    // Element strides {batch', token, head} of q, k, v and the backward's out and dout inputs
    // (head_dim contiguous). batch' is what sequence b adds beyond its first token's place
    // (b seqlen tokens in): the batch stride - seqlen * token stride when dense, 0 when varlen,
    // mod 2^64 (so no branch on the layout). Token and head strides fit 32 bits
    // (KernelParams::new). The forward's out, dq, dk, dv
    // are always contiguous.
    uint64_t q_strides[3], k_strides[3], v_strides[3], o_strides[3], do_strides[3];
};

// Where one sequence of the batch lies, in tokens (core's SeqBounds).
struct SeqBounds {
    int q_start, q_len, k_start, k_len;
};

DEV SeqBounds seq_bounds(const Params& p, int b) {
    SeqBounds s;
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

// Index into lse of row i of the sequence starting at q_start (core's AttentionSpec::lse_index).
DEV uint64_t lse_index(const Params& p, int b, int h, int q_start, int i) {
    if (p.cu_seqlens_q) return (uint64_t)h * p.seqlen_q + q_start + i;
    return ((uint64_t)b * p.heads_q + h) * p.seqlen_q + i;
}

// Element offset of row i (0-based in its sequence) of head h of a strided input, for sequence b
// starting at token `start` (dense: b * seqlen; varlen: cu_seqlens[b]). Rows of one sequence and
// head are `st[1]` elements apart.
DEV uint64_t strided_row(const Params& p, const uint64_t (&st)[3], int b, int start, int i, int h) {
    return (uint64_t)(start + i) * st[1] + (uint64_t)b * st[0] + (uint64_t)h * st[2];
}

// The low bits of a strided input's strides: 0 mod 8 means every row starts 16 bytes after an
// aligned base (16-bit elements), as 16-byte copies need. Base pointers are 16-byte aligned:
// the host allocates its own, and checks the caller's (check_device_pointers).
DEV uint32_t stride_bits(const uint64_t (&st)[3]) { return (uint32_t)(st[0] | st[1] | st[2]); }
