// FP8 e4m3 forward on Hopper, part 1: the arguments beyond Params and V transposed.
// wgmma reads 8-bit B operands K-major only, so O += P V needs V as Vt [head_dim][keys]. This
// kernel writes Vt once per call, before the attention kernel (hopper_fwd.cu with FA_DTYPE 3)
// loads it with TMA like K. Vt is [heads_kv][HEAD_DIM][vt_start[batch]] bytes; sequence b's keys
// start at column vt_start[b] (a multiple of src/fp8.rs KEY_PAD, zero-filled up to the next), so
// a block of keys never reads another sequence's values.
// Keys are stored in the order P's registers hold them: the S accumulators give a thread keys
// 8 g + 2 (lane % 4) + {0, 1} (g = 0..3) of each 32-key step, an 8-bit wgmma A register keys
// 4 (lane % 4) + {0..3} (+16), so column L = 16 h + 4 b + y of a 32-key group holds key
// 16 h + 2 b + (y % 2) + 8 (y / 2) (vt_key) and P needs no shuffles (FA3 paper, section 3.3).
// Prepended: params.cuh and the other headers of the Hopper kernel.

// Must match `Fp8Args` in src/fp8.rs (five pointers).
struct Fp8Args {
    const float* descale_q;  // [batch, heads_kv]: real value = stored value x descale
    const float* descale_k;
    const float* descale_v;
    const int* vt_start;     // [batch + 1]: first Vt column of each sequence
    uint8_t* vt;             // written here, read by the attention kernel's tensor map
};
static_assert(sizeof(Fp8Args) == 40, "Fp8Args is five pointers");

// The key (within its 32-key group) that Vt column L of the group holds.
DEV int vt_key(int l) { return (l & 16) + 2 * ((l >> 2) & 3) + (l & 1) + 8 * ((l >> 1) & 1); }

#define VT_THREADS 256
#define VT_KEYS 32  // keys per block: one group of the P register order

#define VT_ROW (HEAD_DIM / 4 + 1)  // words per key in shared memory: +1, no bank conflicts on the reads

// One block per (32-key group, KV head, sequence): 32 keys x HEAD_DIM bytes through shared
// memory (VT_KEYS x VT_ROW words, dynamic: src/fp8.rs), read as 32-bit words along head_dim,
// written as bytes along the keys.
extern "C" __global__ void __launch_bounds__(VT_THREADS)
fa_fp8_transpose_v(const __grid_constant__ Params p, const __grid_constant__ Fp8Args f) {
    extern __shared__ uint32_t smem[];
    const int group = blockIdx.x, kv_h = blockIdx.y, b = blockIdx.z;
    const int col0 = f.vt_start[b] + VT_KEYS * group;
    if (col0 >= f.vt_start[b + 1]) return;
    const SeqBounds s = seq_bounds(p, b);
    const uint32_t* v = (const uint32_t*)p.v;
    for (int i = threadIdx.x; i < VT_KEYS * HEAD_DIM / 4; i += VT_THREADS) {
        const int key = i / (HEAD_DIM / 4), w = i % (HEAD_DIM / 4);
        const int j = VT_KEYS * group + key;
        smem[key * VT_ROW + w] = j < s.k_len ? v[((uint64_t)(s.k_start + j) * p.heads_kv + kv_h) * (HEAD_DIM / 4) + w] : 0u;
    }
    __syncthreads();
    const uint64_t row_len = (uint64_t)f.vt_start[p.batch];
    for (int i = threadIdx.x; i < VT_KEYS * HEAD_DIM; i += VT_THREADS) {
        const int l = i % VT_KEYS, d = i / VT_KEYS;
        const uint32_t word = smem[vt_key(l) * VT_ROW + d / 4];
        f.vt[((uint64_t)kv_h * HEAD_DIM + d) * row_len + col0 + l] = (uint8_t)(word >> (8 * (d % 4)));
    }
}
