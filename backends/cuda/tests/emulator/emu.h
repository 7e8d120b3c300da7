// A CPU emulator of the CUDA features flashattn's mma.sync and portable kernels use, so that
// their real source runs on a machine without a GPU (tests/emulate.rs). Each CUDA thread of a
// CTA is a fiber (ucontext) on one OS thread, run until it reaches a barrier: warp-collective
// instructions (ldmatrix, mma.sync, shuffles) meet at a per-warp barrier and compute from every
// lane's operands with the PTX ISA's fragment layouts; __syncthreads is a CTA barrier; cp.async
// copies are queued per thread and land at cp.async.wait_group, so a read before the wait sees
// stale data. CTAs run one after another. A barrier no thread can pass is reported (deadlock).
//
// It stands in for ptx.cuh and dtype.cuh (the only headers with inline PTX) and for the CUDA
// built-ins. It checks what it can (ldmatrix / cp.async alignment and bounds) and aborts with a
// message; it does not model timing, so races between warps are not found here.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <ucontext.h>
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
EmuDim3 blockIdx, gridDim, blockDim;

#ifndef EMU_SMEM_T
#define EMU_SMEM_T uint8_t
#endif
#define EMU_SMEM_BYTES 232448
alignas(1024) EMU_SMEM_T smem[EMU_SMEM_BYTES / sizeof(EMU_SMEM_T)];  // the running CTA's

// A barrier of `expected` fibers: the last to arrive opens it (a new generation) and goes on.
struct EmuBarrier {
    unsigned expected = 0, arrived = 0, gen = 0;
};

// One warp's meeting point for collective instructions.
struct EmuWarp {
    EmuBarrier bar;
    uint64_t slot[32][8];
};

struct EmuCopy {
    uint32_t dst;
    const void* src;
    bool valid;
};

// One CUDA thread: its fiber, its indices, what it waits for, its cp.async queue.
struct EmuThread {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    EmuDim3 tid;
    int lane = 0;
    EmuWarp* warp = nullptr;
    const unsigned* wait_gen = nullptr;  // blocked while *wait_gen == wait_for
    unsigned wait_for = 0;
    bool done = false;
    std::vector<std::vector<EmuCopy>> groups;  // committed cp.async groups, oldest first
    std::vector<EmuCopy> open;                 // not committed yet
};
EmuThread* emu_cur;  // the fiber running
ucontext_t emu_sched;
EmuBarrier emu_cta_bar;
#define threadIdx (emu_cur->tid)

[[noreturn]] inline void emu_fail(const char* what, long long a, long long b) {
    std::fprintf(stderr, "emulator: %s (%lld, %lld) in block %u thread %u\n", what, a, b, blockIdx.x,
                 emu_cur ? emu_cur->tid.x : 0u);
    std::fflush(stderr);
    std::abort();
}

inline void emu_wait(EmuBarrier& b) {
    const unsigned g = b.gen;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.gen;
        return;
    }
    emu_cur->wait_gen = &b.gen;
    emu_cur->wait_for = g;
    swapcontext(&emu_cur->ctx, &emu_sched);
}

// A finished thread leaves a barrier: the rest no longer wait for it.
inline void emu_leave(EmuBarrier& b) {
    if (--b.expected == b.arrived && b.arrived > 0) {
        b.arrived = 0;
        ++b.gen;
    }
}

inline void __syncthreads() { emu_wait(emu_cta_bar); }

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

// Every lane posts v, then reads lane `src_of(lane)`'s.
template <class F>
inline float emu_shuffle(float v, F src_of) {
    EmuWarp& w = *emu_cur->warp;
    std::memcpy(&w.slot[emu_cur->lane][0], &v, 4);
    emu_wait(w.bar);
    float r;
    std::memcpy(&r, &w.slot[src_of(emu_cur->lane) & 31][0], 4);
    emu_wait(w.bar);
    return r;
}
inline float __shfl_xor_sync(unsigned, float v, int mask) {
    return emu_shuffle(v, [&](int lane) { return lane ^ mask; });
}
inline float __shfl_sync(unsigned, float v, int src) {
    return emu_shuffle(v, [&](int) { return src; });
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

// ---- ptx.cuh ------------------------------------------------------------------------------
inline uint32_t smem_addr(const void* p) { return (uint32_t)((const uint8_t*)p - (const uint8_t*)smem); }

inline const uint8_t* emu_smem(uint32_t addr, uint32_t bytes, uint32_t align) {
    if (addr % align != 0) emu_fail("misaligned shared address", addr, align);
    if (addr + bytes > EMU_SMEM_BYTES) emu_fail("shared address out of bounds", addr, bytes);
    return (const uint8_t*)smem + addr;
}

inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
    emu_smem(dst, 16, 16);
    if (valid && (uintptr_t)src % 16 != 0) emu_fail("misaligned cp.async source", (long long)(uintptr_t)src, 16);
    emu_cur->open.push_back({dst, src, valid});
}
inline void cp_async_commit() {
    emu_cur->groups.push_back(std::move(emu_cur->open));
    emu_cur->open.clear();
}
template <int N>
inline void cp_async_wait() {
    auto& groups = emu_cur->groups;
    while ((int)groups.size() > N) {
        for (const EmuCopy& c : groups.front()) {
            uint8_t* d = (uint8_t*)smem + c.dst;
            if (c.valid) std::memcpy(d, c.src, 16);
            else std::memset(d, 0, 16);
        }
        groups.erase(groups.begin());
    }
}

#if FA_DTYPE != 0  // ldmatrix and mma.sync: the 16-bit kernels only
// Lane l receives, of matrix i (rows at the addresses of lanes 8i..8i+7), row l/4, columns
// 2(l%4) and +1; transposed: rows 2(l%4) and +1, column l/4.
inline void emu_ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
    EmuWarp& w = *emu_cur->warp;
    const int emu_lane = emu_cur->lane;
    emu_smem(addr, 16, 16);
    w.slot[emu_lane][0] = addr;
    emu_wait(w.bar);
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
    emu_wait(w.bar);
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu_ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu_ldmatrix(r, addr, true); }

// D += A B, m16n8k16, fragments as in the PTX ISA (groupID g = lane / 4, t = lane % 4):
// A: a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..);
// B: b0 (k = 2t.., n = g), b1 (k = 2t + 8.., n = g); D: d0,1 (g, 2t..), d2,3 (g + 8, 2t..).
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    EmuWarp& w = *emu_cur->warp;
    const int emu_lane = emu_cur->lane;
    uint64_t* s = w.slot[emu_lane];
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b0;
    s[5] = b1;
    emu_wait(w.bar);
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
    emu_wait(w.bar);
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}
#endif

// ---- launches -------------------------------------------------------------------------------
inline void atomicAdd(float* a, float v) { *a += v; }  // one CTA runs at a time: plain adds suffice

inline void (*emu_body)();  // the kernel call of the running CTA

// A fiber's body: the kernel, then it leaves the barriers it no longer takes part in.
inline void emu_entry() {
    emu_body();
    emu_leave(emu_cta_bar);
    emu_leave(emu_cur->warp->bar);
    emu_cur->done = true;
}

// Runs one CTA of `threads` threads, each running `body`: every fiber in turn until it blocks
// at a barrier or finishes; a round in which no fiber can move while some are unfinished is a
// deadlock.
inline void emu_run_cta(void (*body)(), unsigned threads) {
    std::memset(smem, 0xcd, sizeof(smem));  // garbage, as a real CTA finds it
    emu_body = body;
    std::vector<EmuWarp> warps(threads / 32);
    for (EmuWarp& w : warps) w.bar.expected = 32;
    emu_cta_bar = EmuBarrier{threads, 0, 0};
    const size_t stack_bytes = 256 * 1024;
    std::vector<EmuThread> ts(threads);
    for (unsigned t = 0; t < threads; ++t) {
        EmuThread& th = ts[t];
        th.tid = {t, 0, 0};
        th.lane = (int)(t % 32);
        th.warp = &warps[t / 32];
        th.stack.reset(new char[stack_bytes]);
        getcontext(&th.ctx);
        th.ctx.uc_stack.ss_sp = th.stack.get();
        th.ctx.uc_stack.ss_size = stack_bytes;
        th.ctx.uc_link = &emu_sched;
        makecontext(&th.ctx, emu_entry, 0);
    }
    for (;;) {
        bool moved = false, all_done = true;
        for (EmuThread& th : ts) {
            if (th.done) continue;
            all_done = false;
            if (th.wait_gen && *th.wait_gen == th.wait_for) continue;
            th.wait_gen = nullptr;
            emu_cur = &th;
            moved = true;
            swapcontext(&emu_sched, &th.ctx);
        }
        emu_cur = nullptr;
        if (all_done) return;
        if (!moved) emu_fail("deadlock: every unfinished thread waits at a barrier", threads, 0);
    }
}

// Runs `body` (a kernel call) on every CTA of `grid`, one CTA after another.
inline void emu_launch(EmuDim3 grid, unsigned threads, void (*body)()) {
    if (threads % 32 != 0 || threads == 0) emu_fail("threads per block must be whole warps", threads, 0);
    gridDim = grid;
    blockDim = {threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                emu_run_cta(body, threads);
            }
}

// ---- the drivers' files ---------------------------------------------------------------------
inline std::vector<char> emu_read(const std::string& path, bool required) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        if (required) emu_fail(("cannot read " + path).c_str(), 0, 0);
        return {};
    }
    return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline void emu_write(const std::string& path, const void* data, size_t n) {
    std::ofstream f(path, std::ios::binary);
    f.write((const char*)data, (std::streamsize)n);
    if (!f) emu_fail(("cannot write " + path).c_str(), 0, 0);
}

// An input tensor, padded so that 16-byte copies of its last row stay inside the allocation.
inline std::vector<char> emu_read_input(const std::string& dir, const char* name) {
    std::vector<char> v = emu_read(dir + "/" + name, true);
    v.resize(v.size() + 64);
    return v;
}

// A plain struct (the kernels' Params) read from its exact bytes.
template <class T>
T emu_read_pod(const std::string& path) {
    std::vector<char> bytes = emu_read(path, true);
    if (bytes.size() != sizeof(T)) emu_fail(("wrong size: " + path).c_str(), (long long)bytes.size(), sizeof(T));
    T x;
    std::memcpy(&x, bytes.data(), sizeof(T));
    return x;
}

// The optional side tables of a spec (cu_q.bin, cu_k.bin, alibi.bin), pointed to by `p`;
// `keep` owns their bytes.
template <class P>
void emu_read_side_tables(P& p, const std::string& dir, std::vector<char> (&keep)[3]) {
    keep[0] = emu_read(dir + "/cu_q.bin", false);
    keep[1] = emu_read(dir + "/cu_k.bin", false);
    keep[2] = emu_read(dir + "/alibi.bin", false);
    p.cu_seqlens_q = keep[0].empty() ? nullptr : (const int*)keep[0].data();
    p.cu_seqlens_k = keep[1].empty() ? nullptr : (const int*)keep[1].data();
    p.alibi = keep[2].empty() ? nullptr : (const float*)keep[2].data();
}
