// Split-KV combine: merges the per-split (O, LSE) slots of the flash kernel into the output
// and the LSE. One invocation per output element pair of the rows [q_tok0, q_tok1), so a
// packed pair is written whole. The host prepends the same modules as for flash_fwd.wgsl
// (no tile constants).

struct Merged {
    value: f32,
    lse_bits: u32, // f32 bits, so a fully masked row can report -inf
}

// Element x of (row, h): sum over slots of exp(lse_s - lse) * O_s, and the merged LSE. Slots
// that saw no key (LSE -inf) are skipped; a NaN LSE makes the row NaN.
fn merge(row: u32, h: u32, x: u32) -> Merged {
    let rows = p.q_tok1 - p.q_tok0;
    var m = NEG_BIG;
    var any = false;
    for (var s = 0u; s < p.num_splits; s++) {
        let bits = part[p.part_lse + (s * rows + row) * p.heads_q + h];
        if is_nan(bitcast<f32>(bits)) {
            return Merged(bitcast<f32>(bits), bits);
        }
        if bits != NEG_INF_BITS {
            m = max(m, bitcast<f32>(bits));
            any = true;
        }
    }
    if !any {
        return Merged(0.0, NEG_INF_BITS);
    }
    var sum = 0.0;
    var acc = 0.0;
    for (var s = 0u; s < p.num_splits; s++) {
        let pr = (s * rows + row) * p.heads_q + h;
        let bits = part[p.part_lse + pr];
        if bits != NEG_INF_BITS {
            let w = exp(bitcast<f32>(bits) - m);
            sum += w;
            acc += w * bitcast<f32>(part[pr * p.dv + x]);
        }
    }
    return Merged(acc / sum, bitcast<u32>(m + log(sum)));
}

fn write_lse(row: u32, h: u32, bits: u32) {
    if !has_flag(FLAG_LSE) {
        return;
    }
    let tok = p.q_tok0 + row;
    if has_flag(FLAG_VARLEN) {
        lse[h * p.seqlen_q + tok] = bits;
    } else {
        let b = tok / p.seqlen_q;
        lse[(b * p.heads_q + h) * p.seqlen_q + tok % p.seqlen_q] = bits;
    }
}

// Varlen tokens past cu_seqlens_q[batch] belong to no sequence: no kernel wrote their slots.
fn outside_every_sequence(row: u32) -> bool {
    return has_flag(FLAG_VARLEN) && p.q_tok0 + row >= tables[p.batch];
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row_elems = p.heads_q * p.dv;
    let total = (p.q_tok1 - p.q_tok0) * row_elems;
    let pair = gid.x + gid.y * nwg.x * 64u;
    let e0 = pair * 2u;
    if e0 >= total {
        return;
    }
    var vals: array<f32, 2>;
    for (var c = 0u; c < 2u; c++) {
        let e = e0 + c;
        if e < total {
            let row = e / row_elems;
            let h = (e % row_elems) / p.dv;
            let x = e % p.dv;
            if outside_every_sequence(row) {
                vals[c] = 0.0;
            } else {
                let r = merge(row, h, x);
                vals[c] = r.value;
                if x == 0u {
                    write_lse(row, h, r.lse_bits);
                }
            }
        }
    }
    st_out_pair(e0, vals[0], vals[1], e0 + 1u < total);
}
