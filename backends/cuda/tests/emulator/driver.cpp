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
    Params p = emu_read_pod<Params>(dir + "/params.bin");
    unsigned gx, gy, gz, threads;
    size_t out_bytes, lse_floats;
    {
        std::ifstream f(dir + "/launch.txt");
        if (!(f >> gx >> gy >> gz >> threads >> out_bytes >> lse_floats)) emu_fail("bad launch.txt", 0, 0);
    }
    auto input = [&](const char* name) { return emu_read_input(dir, name); };
    std::vector<char> q = input("q.bin"), k = input("k.bin"), v = input("v.bin");
    std::vector<char> side[3];
    emu_read_side_tables(p, dir, side);
    std::vector<char> out(out_bytes + 64, 0);
    std::vector<float> lse(lse_floats, -INFINITY);
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.out = out.data();
    p.lse = lse_floats ? lse.data() : nullptr;
#ifdef EMU_FP8_VT
    std::vector<char> vt_start = emu_read(dir + "/vt_start.bin", true);
    emu_fp8.vt_start = (const int*)vt_start.data();
    std::memset(out.data(), 0xcd, out.size());
    emu_fp8.vt = (uint8_t*)out.data();
#endif

    emu_params = &p;
    emu_launch({gx, gy, gz}, threads, emu_kernel);
    emu_write(dir + "/out.bin", out.data(), out_bytes);
    emu_write(dir + "/lse.bin", lse.data(), lse.size() * 4);
    return 0;
}
