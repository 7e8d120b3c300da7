// Runs one flashattn kernel in the emulator (emu.h) on inputs written by tests/emulate.rs:
//   driver DIR   with DIR/params.bin (the kernel's Params, pointers filled in here), launch.txt
//   ("grid_x grid_y grid_z threads out_bytes lse_floats"), q.bin k.bin v.bin and, when the
//   spec has them, cu_q.bin cu_k.bin alibi.bin; writes DIR/out.bin and DIR/lse.bin.
// The harness prepends emu.h and the kernel's sources and defines EMU_KERNEL (its entry point).
// With EMU_FP8_VT the kernel is the FP8 V transpose (fp8_vt.cu): its Fp8Args take vt_start.bin,
// and its Vt is the output (out.bin, out_bytes long, preset to 0xcd so unwritten bytes show).

static const Params* emu_params;
#ifdef EMU_FP8_VT
static Fp8Args emu_fp8;
static void emu_kernel() { EMU_KERNEL(*emu_params, emu_fp8); }
#else
static void emu_kernel() { EMU_KERNEL(*emu_params); }
#endif

int main(int argc, char** argv) {
    if (argc != 2) emu_fail("usage: driver DIR", argc, 0);
    const std::string dir = argv[1];
    std::vector<char> pbytes = emu_read(dir + "/params.bin", true);
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
        std::vector<char> v = emu_read(dir + "/" + name, required);
        v.resize(v.size() + 64);
        return v;
    };
    std::vector<char> q = input("q.bin", true), k = input("k.bin", true), v = input("v.bin", true);
    std::vector<char> cu_q = emu_read(dir + "/cu_q.bin", false), cu_k = emu_read(dir + "/cu_k.bin", false);
    std::vector<char> alibi = emu_read(dir + "/alibi.bin", false);
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
    std::vector<char> vt_start = emu_read(dir + "/vt_start.bin", true);
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
                emu_params = &p;
                emu_run_cta(emu_kernel, threads);
            }
    emu_write(dir + "/out.bin", out.data(), out_bytes);
    emu_write(dir + "/lse.bin", lse.data(), lse.size() * 4);
    return 0;
}
