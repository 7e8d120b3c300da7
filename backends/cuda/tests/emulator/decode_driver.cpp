// Runs the launches of one decode call in the emulator (emu.h) on files written by
// tests/emulate_decode.rs:
//   decode_driver DIR   with DIR/params.bin (DecodeParams, pointers filled in here),
//   sizes.txt ("out_bytes lse_floats q_rot_bytes part_out_floats part_lse_floats"),
//   launches.txt (one line per launch: "entry grid_x threads append_b0 append_batches rotate_q"),
//   q.bin k_cache.bin v_cache.bin seqlens.bin and, when the call has them, k_new.bin v_new.bin
//   block_table.bin batch_idx.bin rot_cos.bin rot_sin.bin alibi.bin; writes DIR/out.bin,
//   lse.bin and the caches after the call (k_out.bin, v_out.bin).
// The harness prepends emu.h, the family's sources and `emu_entries`, the table of its entry
// points by name. Partial buffers start as NaN, so a read of a partial no split wrote shows.

static const DecodeParams* emu_dparams;
static void (*emu_decode_fn)(DecodeParams);
static void emu_decode_kernel() { emu_decode_fn(*emu_dparams); }

int main(int argc, char** argv) {
    if (argc != 2) emu_fail("usage: decode_driver DIR", argc, 0);
    const std::string dir = argv[1];
    DecodeParams base = emu_read_pod<DecodeParams>(dir + "/params.bin");
    size_t out_bytes, lse_floats, q_rot_bytes, part_out_floats, part_lse_floats;
    {
        std::ifstream f(dir + "/sizes.txt");
        if (!(f >> out_bytes >> lse_floats >> q_rot_bytes >> part_out_floats >> part_lse_floats))
            emu_fail("bad sizes.txt", 0, 0);
    }
    // Inputs, padded so that 16-byte copies of the last row stay inside the allocation.
    auto input = [&](const char* name, bool required) {
        std::vector<char> v = emu_read(dir + "/" + name, required);
        if (!v.empty()) v.resize(v.size() + 64);
        return v;
    };
    std::vector<char> q = input("q.bin", true), k_cache = input("k_cache.bin", true), v_cache = input("v_cache.bin", true);
    std::vector<char> k_new = input("k_new.bin", false), v_new = input("v_new.bin", false);
    std::vector<char> seqlens = input("seqlens.bin", true), table = input("block_table.bin", false);
    std::vector<char> batch_idx = input("batch_idx.bin", false), alibi = input("alibi.bin", false);
    std::vector<char> cos = input("rot_cos.bin", false), sin = input("rot_sin.bin", false);
    std::vector<char> out(out_bytes + 64, 0), q_rot(q_rot_bytes + 64, 0);
    std::vector<float> lse(lse_floats, -INFINITY);
    std::vector<float> part_out(part_out_floats, NAN), part_lse(part_lse_floats, NAN);
    auto ptr = [](std::vector<char>& v) -> void* { return v.empty() ? nullptr : v.data(); };
    base.attn.q = q_rot_bytes ? q_rot.data() : q.data();
    base.attn.k = k_cache.data();
    base.attn.v = v_cache.data();
    base.attn.out = out.data();
    base.attn.lse = lse_floats ? lse.data() : nullptr;
    base.attn.alibi = (const float*)ptr(alibi);
    base.q_in = q.data();
    base.k_new = ptr(k_new);
    base.v_new = ptr(v_new);
    base.seqlens = (const int*)seqlens.data();
    base.block_table = (const int*)ptr(table);
    base.batch_idx = (const int*)ptr(batch_idx);
    base.rot_cos = (const float*)ptr(cos);
    base.rot_sin = (const float*)ptr(sin);
    base.part_out = part_out.empty() ? nullptr : part_out.data();
    base.part_lse = part_lse.empty() ? nullptr : part_lse.data();

    std::ifstream launches(dir + "/launches.txt");
    std::string name;
    unsigned grid, threads;
    int b0, batches, rotate_q;
    while (launches >> name >> grid >> threads >> b0 >> batches >> rotate_q) {
        emu_decode_fn = nullptr;
        for (const EmuEntry& e : emu_entries)
            if (name == e.name) emu_decode_fn = e.fn;
        if (!emu_decode_fn) emu_fail(("no entry point " + name).c_str(), 0, 0);
        DecodeParams p = base;
        p.append_b0 = b0;
        p.append_batches = batches;
        p.rotate_q = rotate_q;
        emu_dparams = &p;
        emu_launch({grid, 1, 1}, threads, emu_decode_kernel);
    }
    emu_write(dir + "/out.bin", out.data(), out_bytes);
    emu_write(dir + "/lse.bin", lse.data(), lse.size() * 4);
    emu_write(dir + "/k_out.bin", k_cache.data(), k_cache.size() - 64);
    emu_write(dir + "/v_out.bin", v_cache.data(), v_cache.size() - 64);
    return 0;
}
