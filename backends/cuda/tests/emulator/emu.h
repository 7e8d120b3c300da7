// A CPU emulator of the CUDA features flashattn's mma.sync and portable kernels use, so that
// their real source runs on a machine without a GPU (tests/emulate.rs). Each CUDA thread of a
// CTA is an OS thread; warp-collective instructions (ldmatrix, mma.sync, shuffles) meet at a
// per-warp barrier and compute from every lane's operands with the PTX ISA's fragment layouts;
// __syncthreads is a CTA barrier; cp.async copies are queued per thread and land at
// cp.async.wait_group, so a read before the wait sees stale data. CTAs run one at a time.
//
// It stands in for ptx.cuh and dtype.cuh (the only headers with inline PTX) and for the CUDA
// built-ins. It checks what it can (ldmatrix / cp.async alignment and bounds) and aborts with a
// message; it does not model timing, so races between warps are not found here.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n)

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local EmuDim3 threadIdx, blockIdx;
EmuDim3 gridDim, blockDim;

#ifndef EMU_SMEM_T
#define EMU_SMEM_T uint8_t
#endif
#define EMU_SMEM_BYTES 232448
alignas(1024) EMU_SMEM_T smem[EMU_SMEM_BYTES / sizeof(EMU_SMEM_T)];  // the running CTA's

[[noreturn]] inline void emu_fail(const char* what, long long a, long long b) {
    std::fprintf(stderr, "emulator: %s (%lld, %lld) in block %u thread %u\n", what, a, b, blockIdx.x, threadIdx.x);
    std::fflush(stderr);
    std::abort();
}

// One warp's meeting point for collective instructions.
struct EmuWarp {
    std::barrier<> bar{32};
    uint64_t slot[32][8];
};
std::barrier<>* emu_cta_bar;
thread_local EmuWarp* emu_warp;
thread_local int emu_lane;

inline void __syncthreads() { emu_cta_bar->arrive_and_wait(); }

// ---- built-ins ----------------------------------------------------------------------------
inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline float __uint_as_float(unsigned x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
// exp2f, fabsf, fmaxf, tanhf: the C library's, from <cmath>.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    EmuWarp& w = *emu_warp;
    std::memcpy(&w.slot[emu_lane][0], &v, 4);
    w.bar.arrive_and_wait();
    float r;
    std::memcpy(&r, &w.slot[emu_lane ^ mask][0], 4);
    w.bar.arrive_and_wait();
    return r;
}
inline float __shfl_sync(unsigned, float v, int src) {
    EmuWarp& w = *emu_warp;
    std::memcpy(&w.slot[emu_lane][0], &v, 4);
    w.bar.arrive_and_wait();
    float r;
    std::memcpy(&r, &w.slot[src & 31][0], 4);
    w.bar.arrive_and_wait();
    return r;
}

// ---- dtype.cuh --------------------------------------------------------------------------
inline float bf16_to_f32(uint16_t x) { return __uint_as_float(((uint32_t)x) << 16); }
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
inline float f16_to_f32(uint16_t x) {
    _Float16 h;
    std::memcpy(&h, &x, 2);
    return (float)h;
}
inline uint16_t f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    uint16_t x;
    std::memcpy(&x, &h, 2);
    return x;
}
inline uint32_t pack_bf16x2(float lo, float hi) { return f32_to_bf16(lo) | ((uint32_t)f32_to_bf16(hi) << 16); }
inline uint32_t pack_f16x2(float lo, float hi) { return f32_to_f16(lo) | ((uint32_t)f32_to_f16(hi) << 16); }

#if FA_DTYPE == 0
typedef float elem_t;
inline float load_elem(const elem_t* p, uint64_t i) { return p[i]; }
inline void store_elem(elem_t* p, uint64_t i, float x) { p[i] = x; }
#else
typedef uint16_t elem_t;
inline float to_f32(uint16_t x) { return FA_DTYPE == 1 ? f16_to_f32(x) : bf16_to_f32(x); }
inline float load_elem(const elem_t* p, uint64_t i) { return to_f32(p[i]); }
inline void store_elem(elem_t* p, uint64_t i, float x) { p[i] = FA_DTYPE == 1 ? f32_to_f16(x) : f32_to_bf16(x); }
#endif

// ---- ptx.cuh (the 16-bit kernels only) ----------------------------------------------------
#if FA_DTYPE != 0
inline uint32_t smem_addr(const void* p) { return (uint32_t)((const uint8_t*)p - (const uint8_t*)smem); }

inline const uint8_t* emu_smem(uint32_t addr, uint32_t bytes, uint32_t align) {
    if (addr % align != 0) emu_fail("misaligned shared address", addr, align);
    if (addr + bytes > EMU_SMEM_BYTES) emu_fail("shared address out of bounds", addr, bytes);
    return (const uint8_t*)smem + addr;
}

struct EmuCopy {
    uint32_t dst;
    const void* src;
    bool valid;
};
thread_local std::vector<std::vector<EmuCopy>> emu_groups;  // committed groups, oldest first
thread_local std::vector<EmuCopy> emu_open;                // not committed yet

inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
    emu_smem(dst, 16, 16);
    if (valid && (uintptr_t)src % 16 != 0) emu_fail("misaligned cp.async source", (long long)(uintptr_t)src, 16);
    emu_open.push_back({dst, src, valid});
}
inline void cp_async_commit() {
    emu_groups.push_back(emu_open);
    emu_open.clear();
}
template <int N>
inline void cp_async_wait() {
    while ((int)emu_groups.size() > N) {
        for (const EmuCopy& c : emu_groups.front()) {
            uint8_t* d = (uint8_t*)smem + c.dst;
            if (c.valid) std::memcpy(d, c.src, 16);
            else std::memset(d, 0, 16);
        }
        emu_groups.erase(emu_groups.begin());
    }
}

// Lane l receives, of matrix i (rows at the addresses of lanes 8i..8i+7), row l/4, columns
// 2(l%4) and +1; transposed: rows 2(l%4) and +1, column l/4.
inline void emu_ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
    EmuWarp& w = *emu_warp;
    emu_smem(addr, 16, 16);
    w.slot[emu_lane][0] = addr;
    w.bar.arrive_and_wait();
    for (int i = 0; i < 4; ++i) {
        uint16_t h[2];
        for (int k = 0; k < 2; ++k) {
            const int row = trans ? 2 * (emu_lane % 4) + k : emu_lane / 4;
            const int col = trans ? emu_lane / 4 : 2 * (emu_lane % 4) + k;
            const uint16_t* p = (const uint16_t*)emu_smem((uint32_t)w.slot[8 * i + row][0], 16, 16);
            h[k] = p[col];
        }
        r[i] = h[0] | ((uint32_t)h[1] << 16);
    }
    w.bar.arrive_and_wait();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu_ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu_ldmatrix(r, addr, true); }

// D += A B, m16n8k16, fragments as in the PTX ISA (groupID g = lane / 4, t = lane % 4):
// A: a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..);
// B: b0 (k = 2t.., n = g), b1 (k = 2t + 8.., n = g); D: d0,1 (g, 2t..), d2,3 (g + 8, 2t..).
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    EmuWarp& w = *emu_warp;
    uint64_t* s = w.slot[emu_lane];
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b0;
    s[5] = b1;
    w.bar.arrive_and_wait();
    auto half = [](uint64_t reg, int hi) { return to_f32((uint16_t)(reg >> (16 * hi))); };
    auto A = [&](int row, int k) {
        const int reg = (row >= 8) + 2 * (k >= 8);
        return half(w.slot[(row % 8) * 4 + (k % 8) / 2][reg], k % 2);
    };
    auto B = [&](int k, int n) { return half(w.slot[n * 4 + (k % 8) / 2][4 + (k >= 8)], k % 2); };
    const int g = emu_lane / 4, t = emu_lane % 4;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
        float acc = d[e];
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        out[e] = acc;
    }
    w.bar.arrive_and_wait();
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}
#endif
