// Backward, step 1: the per-row statistics the gradient kernels read, for the query tokens
// [q_tok0, q_tok1) and every head: (LSE * log2(e), delta = sum_e dout * out), one invocation
// per (token, head). The host prepends params.wgsl, mask.wgsl, score_mod.wgsl and the dtype file.

@group(0) @binding(1) var<storage, read> fwd_out: array<Elem>;
@group(0) @binding(2) var<storage, read> grad_out: array<Elem>;
// The forward's LSE as f32 bits, in its layout (bound whole).
@group(0) @binding(3) var<storage, read> lse_in: array<u32>;
@group(0) @binding(4) var<storage, read_write> row_stats: array<vec2<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    if idx >= (p.q_tok1 - p.q_tok0) * p.heads_q {
        return;
    }
    let h = idx % p.heads_q;
    let tok = p.q_tok0 + idx / p.heads_q;
    let b = select(tok / p.seqlen_q, 0u, has_flag(FLAG_VARLEN));
    let o_base = at_out(b, tok, h);
    let g_base = at_dout(b, tok, h);
    var delta = 0.0;
    for (var e = 0u; e < p.dv; e++) {
        let i = o_base + e;
        let j = g_base + e;
        delta += elem_get(fwd_out[elem_word(i)], i) * elem_get(grad_out[elem_word(j)], j);
    }
    var at = h * p.seqlen_q + tok;
    if !has_flag(FLAG_VARLEN) {
        at = (tok / p.seqlen_q * p.heads_q + h) * p.seqlen_q + tok % p.seqlen_q;
    }
    row_stats[idx] = vec2<f32>(bitcast<f32>(lse_in[at]) * LOG2E, delta);
}
