// Runs one flashattn kernel in the emulator (emu.h) on inputs written by tests/emulate.rs:
//   driver DIR   with DIR/params.bin (the kernel's Params, pointers filled in here), launch.txt
//   ("grid_x grid_y grid_z threads out_bytes lse_floats"), q.bin k.bin v.bin and, when the
//   spec has them, cu_q.bin cu_k.bin alibi.bin; writes DIR/out.bin and DIR/lse.bin.
// The harness prepends emu.h and the kernel's sources and defines EMU_KERNEL (its entry point).
#include <fstream>
#include <memory>
#include <string>
#include <thread>

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

    gridDim = {gx, gy, gz};
    blockDim = {threads, 1, 1};
    if (threads % 32 != 0 || threads == 0) emu_fail("threads per block must be whole warps", threads, 0);
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                std::memset(smem, 0xcd, sizeof(smem));  // garbage, as a real CTA finds it
                std::vector<std::unique_ptr<EmuWarp>> warps;
                for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<EmuWarp>());
                std::barrier<> cta(threads);
                emu_cta_bar = &cta;
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; ++t)
                    ts.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        emu_warp = warps[t / 32].get();
                        emu_lane = (int)(t % 32);
                        EMU_KERNEL(p);
                        // A finished thread leaves the CTA's barrier and its warp's.
                        cta.arrive_and_drop();
                        emu_warp->bar.arrive_and_drop();
                    });
                for (auto& t : ts) t.join();
            }
    write_file(dir + "/out.bin", out.data(), out_bytes);
    write_file(dir + "/lse.bin", lse.data(), lse.size() * 4);
    return 0;
}
