// Naive backward, the benchmark's peer: materialises P, then dS, as f32 score matrices. The
// host runs it per (sequence b, kv head kh): the score rows of the group's query heads,
// numbered (b * heads_q + h) * seqlen_q + i, are [q_tok0, q_tok1), and `scores` is bound
// to that group's region of the matrix [batch, heads_q, seqlen_q, seqlen_k]. Entry points, in
// order: probs (P from the forward's LSE), grad_v (dv = P^T dout), dscores (dS in place of P),
// grad_q (dq = dS k), grad_k (dk = dS^T q), each gradient written to `grad` in the dtype.
// Dense specs only; packed (bf16) gradients need even head dims (pairs never cross a head).
// The host prepends params.wgsl, mask.wgsl, score_mod.wgsl, the dtype file, io_qkv.wgsl and
// io_backward.wgsl (stats bound whole).

@group(0) @binding(7) var<storage, read_write> scores: array<f32>;
@group(0) @binding(8) var<storage, read_write> grad: array<Elem>;

fn st_grad_pair(i: u32, a: f32, b: f32, both: bool) {
    if PACKED {
        grad[i >> 1u] = elem_pair(a, b, both);
    } else {
        grad[i] = elem_of(a);
        if both { grad[i + 1u] = elem_of(b); }
    }
}

// The group's sequence and kv head.
fn group_b() -> u32 { return p.q_tok0 / (p.heads_q * p.seqlen_q); }
fn group_kh() -> u32 { return (p.q_tok0 / p.seqlen_q) % p.heads_q / p.group; }

// A score entry: local row r of the group (head g = r / seqlen_q, row i), key j.
struct Entry {
    ok: bool,
    visible: bool,
    i: u32,
    h: u32,
    j: u32,
    at: u32,
}

fn entry(gid: vec3<u32>) -> Entry {
    let j = gid.x;
    let r = gid.y + gid.z * 65535u * 16u;
    let ok = p.q_tok0 + r < p.q_tok1 && j < p.seqlen_k;
    let i = r % p.seqlen_q;
    let h = group_kh() * p.group + r / p.seqlen_q;
    let keys = mask_keys(i32(i), i32(p.seqlen_q), i32(p.seqlen_k));
    let visible = i32(j) >= keys.start && i32(j) < keys.end;
    return Entry(ok, visible, i, h, j, r * p.seqlen_k + j);
}

fn q_at(e: Entry, x: u32) -> u32 { return ((group_b() * p.seqlen_q + e.i) * p.heads_q + e.h) * p.d + x; }
fn k_at(j: u32, x: u32) -> u32 { return ((group_b() * p.seqlen_k + j) * p.heads_kv + group_kh()) * p.d + x; }
fn v_at(j: u32, x: u32) -> u32 { return ((group_b() * p.seqlen_k + j) * p.heads_kv + group_kh()) * p.dv + x; }
fn o_at(i: u32, h: u32, x: u32) -> u32 { return ((group_b() * p.seqlen_q + i) * p.heads_q + h) * p.dv + x; }
fn stats_of(e: Entry) -> vec2<f32> { return stats[(group_b() * p.seqlen_q + e.i) * p.heads_q + e.h]; }

fn qk(e: Entry) -> f32 {
    var dot = 0.0;
    for (var x = 0u; x < p.d; x++) {
        dot += ld_q(q_at(e, x)) * ld_k(k_at(e.j, x));
    }
    return dot;
}

@compute @workgroup_size(16, 16)
fn probs(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = entry(gid);
    if !e.ok {
        return;
    }
    var pe = 0.0;
    if e.visible {
        let diag = i32(e.i) + i32(p.seqlen_k) - i32(p.seqlen_q);
        let s = score_apply(qk(e), alibi_slope_log2(group_b(), e.h), diag - i32(e.j));
        pe = exp2(s - stats_of(e).x);
    }
    scores[e.at] = pe;
}

@compute @workgroup_size(16, 16)
fn dscores(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = entry(gid);
    if !e.ok || !e.visible {
        return; // P is 0 there, and so is dS
    }
    var dp = 0.0;
    for (var x = 0u; x < p.dv; x++) {
        dp += ld_dout(o_at(e.i, e.h, x)) * ld_v(v_at(e.j, x));
    }
    scores[e.at] = p.scale * scores[e.at] * (dp - stats_of(e).y) * softcap_grad(qk(e));
}

// The invocation's element pair (x, x + 1) of row `row` of a tensor with `dim` elements per
// row and `rows` rows; `ok` false past the end.
struct Pair {
    ok: bool,
    row: u32,
    x: u32,
    both: bool,
}

fn pair_of(gid: vec3<u32>, nwg: vec3<u32>, rows: u32, dim: u32) -> Pair {
    let half = (dim + 1u) / 2u;
    let pi = gid.x + gid.y * nwg.x * 64u;
    let x = 2u * (pi % half);
    return Pair(pi < rows * half, pi / half, x, x + 1u < dim);
}

@compute @workgroup_size(64)
fn grad_v(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pr = pair_of(gid, nwg, p.seqlen_k, p.dv);
    if !pr.ok {
        return;
    }
    var a = 0.0;
    var b = 0.0;
    for (var r = 0u; r < p.group * p.seqlen_q; r++) {
        let pe = scores[r * p.seqlen_k + pr.row];
        let at = o_at(r % p.seqlen_q, group_kh() * p.group + r / p.seqlen_q, pr.x);
        a += pe * ld_dout(at);
        if pr.both {
            b += pe * ld_dout(at + 1u);
        }
    }
    st_grad_pair(v_at(pr.row, pr.x), a, b, pr.both);
}

@compute @workgroup_size(64)
fn grad_q(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pr = pair_of(gid, nwg, p.q_tok1 - p.q_tok0, p.d);
    if !pr.ok {
        return;
    }
    var a = 0.0;
    var b = 0.0;
    for (var j = 0u; j < p.seqlen_k; j++) {
        let ds = scores[pr.row * p.seqlen_k + j];
        a += ds * ld_k(k_at(j, pr.x));
        if pr.both {
            b += ds * ld_k(k_at(j, pr.x + 1u));
        }
    }
    let h = group_kh() * p.group + pr.row / p.seqlen_q;
    let at = ((group_b() * p.seqlen_q + pr.row % p.seqlen_q) * p.heads_q + h) * p.d + pr.x;
    st_grad_pair(at, a, b, pr.both);
}

@compute @workgroup_size(64)
fn grad_k(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pr = pair_of(gid, nwg, p.seqlen_k, p.d);
    if !pr.ok {
        return;
    }
    var a = 0.0;
    var b = 0.0;
    for (var r = 0u; r < p.group * p.seqlen_q; r++) {
        let ds = scores[r * p.seqlen_k + pr.row];
        let h = group_kh() * p.group + r / p.seqlen_q;
        let at = ((group_b() * p.seqlen_q + r % p.seqlen_q) * p.heads_q + h) * p.d + pr.x;
        a += ds * ld_q(at);
        if pr.both {
            b += ds * ld_q(at + 1u);
        }
    }
    st_grad_pair(k_at(pr.row, pr.x), a, b, pr.both);
}
