// Runs one flashattn kernel in the emulator (emu.h) on inputs written by tests/emulate.rs:
//   driver DIR   with DIR/params.bin (the kernel's Params, pointers filled in here), launch.txt
//   ("grid_x grid_y grid_z threads out_bytes lse_floats"), q.bin k.bin v.bin and, when the
//   spec has them, cu_q.bin cu_k.bin alibi.bin; writes DIR/out.bin and DIR/lse.bin.
// The harness prepends emu.h and the kernel's sources and defines EMU_KERNEL (its entry point).
// With EMU_FP8_VT the kernel is the FP8 V transpose (fp8_vt.cu): its Fp8Args take vt_start.bin,
// and its Vt is the output (out.bin, out_bytes long, preset to 0xcd so unwritten bytes show).
#include <fstream>
#include <string>

static std::vector<char> read_file(const std::string& path, bool required) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        if (required) emu_fail(("cannot read " + path).c_str(), 0, 0);
        return {};
    }
    return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

static void write_file(const std::string& path, const void* data, size_t n) {
    std::ofstream f(path, std::ios::binary);
    f.write((const char*)data, (std::streamsize)n);
    if (!f) emu_fail(("cannot write " + path).c_str(), 0, 0);
}

static const Params* emu_params;
#ifdef EMU_FP8_VT
static Fp8Args emu_fp8;
#define EMU_CALL() EMU_KERNEL(*emu_params, emu_fp8)
#else
#define EMU_CALL() EMU_KERNEL(*emu_params)
#endif

// A fiber's body: the kernel, then it leaves the barriers it no longer takes part in.
static void emu_entry() {
    EMU_CALL();
    emu_leave(emu_cta_bar);
    emu_leave(emu_cur->warp->bar);
    emu_cur->done = true;
}

// Runs one CTA: every fiber in turn until it blocks at a barrier or finishes; a round in which
// no fiber can move while some are unfinished is a deadlock.
static void run_cta(const Params& p, unsigned threads) {
    std::memset(smem, 0xcd, sizeof(smem));  // garbage, as a real CTA finds it
    emu_params = &p;
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

int main(int argc, char** argv) {
    if (argc != 2) emu_fail("usage: driver DIR", argc, 0);
    const std::string dir = argv[1];
    std::vector<char> pbytes = read_file(dir + "/params.bin", true);
    if (pbytes.size() != sizeof(Params)) emu_fail("params.bin has the wrong size", (long long)pbytes.size(), sizeof(Params));
    Params p;
    std::memcpy(&p, pbytes.data(), sizeof(Params));
    unsigned gx, gy, gz, threads;
    size_t out_bytes, lse_floats;
    {
        std::ifstream f(dir + "/launch.txt");
        if (!(f >> gx >> gy >> gz >> threads >> out_bytes >> lse_floats)) emu_fail("bad launch.txt", 0, 0);
    }
    // Inputs, padded so that 16-byte copies of the last row stay inside the allocation.
    auto input = [&](const char* name, bool required) {
        std::vector<char> v = read_file(dir + "/" + name, required);
        v.resize(v.size() + 64);
        return v;
    };
    std::vector<char> q = input("q.bin", true), k = input("k.bin", true), v = input("v.bin", true);
    std::vector<char> cu_q = read_file(dir + "/cu_q.bin", false), cu_k = read_file(dir + "/cu_k.bin", false);
    std::vector<char> alibi = read_file(dir + "/alibi.bin", false);
    std::vector<char> out(out_bytes + 64, 0);
    std::vector<float> lse(lse_floats, -INFINITY);
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.out = out.data();
    p.lse = lse_floats ? lse.data() : nullptr;
    p.cu_seqlens_q = cu_q.empty() ? nullptr : (const int*)cu_q.data();
    p.cu_seqlens_k = cu_k.empty() ? nullptr : (const int*)cu_k.data();
    p.alibi = alibi.empty() ? nullptr : (const float*)alibi.data();
#ifdef EMU_FP8_VT
    std::vector<char> vt_start = read_file(dir + "/vt_start.bin", true);
    emu_fp8.vt_start = (const int*)vt_start.data();
    std::memset(out.data(), 0xcd, out.size());
    emu_fp8.vt = (uint8_t*)out.data();
#endif

    gridDim = {gx, gy, gz};
    blockDim = {threads, 1, 1};
    if (threads % 32 != 0 || threads == 0) emu_fail("threads per block must be whole warps", threads, 0);
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                run_cta(p, threads);
            }
    write_file(dir + "/out.bin", out.data(), out_bytes);
    write_file(dir + "/lse.bin", lse.data(), lse.size() * 4);
    return 0;
}
