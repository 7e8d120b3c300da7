// Runs the backward kernels of one call in the emulator (emu.h) on inputs written by
// tests/emulate.rs: driver DIR with DIR/params.bin (Params, pointers filled in here),
// launches.txt ("dq_bytes dk_bytes dv_bytes lse_floats accum_floats", then one
// "stage grid_x grid_y grid_z threads" line per launch, stage as src/backward.rs's Stage: 0 prep,
// 1 post, 2 main, 3 dq), q.bin k.bin v.bin out.bin lse.bin dout.bin and, when the spec has them,
// cu_q.bin cu_k.bin alibi.bin; writes DIR/dq.bin, dk.bin, dv.bin (zeroed first, as the
// backend's host path allocates them). The harness prepends emu.h and the family's sources and
// defines EMU_MAIN and EMU_DQ (its main and dq kernels).

// The arguments every stage takes a part of (backward.rs: launch_backward).
struct EmuBwdArgs {
    Params p;
    const elem_t* dout;
    float *delta, *accum;
    elem_t *dq, *dk, *dv;
};
static EmuBwdArgs a;

int main(int argc, char** argv) {
    if (argc != 2) emu_fail("usage: driver_bwd DIR", argc, 0);
    const std::string dir = argv[1];
    a.p = emu_read_pod<Params>(dir + "/params.bin");
    std::ifstream f(dir + "/launches.txt");
    size_t dq_bytes, dk_bytes, dv_bytes, lse_floats, accum_floats;
    if (!(f >> dq_bytes >> dk_bytes >> dv_bytes >> lse_floats >> accum_floats)) emu_fail("bad launches.txt", 0, 0);
    std::vector<char> q = emu_read_input(dir, "q.bin"), k = emu_read_input(dir, "k.bin"), v = emu_read_input(dir, "v.bin");
    std::vector<char> out = emu_read_input(dir, "out.bin"), lse = emu_read_input(dir, "lse.bin");
    std::vector<char> dout = emu_read_input(dir, "dout.bin");
    std::vector<char> side[3];
    emu_read_side_tables(a.p, dir, side);
    std::vector<char> dq(dq_bytes + 64, 0), dk(dk_bytes + 64, 0), dv(dv_bytes + 64, 0);
    std::vector<float> delta(lse_floats + 16), accum(accum_floats);
    a.p.q = q.data();
    a.p.k = k.data();
    a.p.v = v.data();
    a.p.out = out.data();
    a.p.lse = (float*)lse.data();
    a.dout = (const elem_t*)dout.data();
    a.delta = delta.data();
    a.accum = accum_floats ? accum.data() : nullptr;
    a.dq = (elem_t*)dq.data();
    a.dk = (elem_t*)dk.data();
    a.dv = (elem_t*)dv.data();
    int stage;
    unsigned gx, gy, gz, threads;
    while (f >> stage >> gx >> gy >> gz >> threads) {
        void (*body)() = nullptr;
        switch (stage) {
            case 0: body = [] { fa_bwd_prep(a.p, a.dout, a.delta, a.accum); }; break;
            case 1: body = [] { fa_bwd_post(a.p, a.accum, a.dq); }; break;
            case 2: body = [] { EMU_MAIN(a.p, a.dout, a.delta, a.accum, a.dk, a.dv); }; break;
            case 3: body = [] { EMU_DQ(a.p, a.dout, a.delta, a.dq); }; break;
            default: emu_fail("unknown stage", stage, 0);
        }
        emu_launch({gx, gy, gz}, threads, body);
    }
    emu_write(dir + "/dq.bin", dq.data(), dq_bytes);
    emu_write(dir + "/dk.bin", dk.data(), dk_bytes);
    emu_write(dir + "/dv.bin", dv.data(), dv_bytes);
    return 0;
}
