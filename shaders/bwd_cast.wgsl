// Backward, last step for f16 / bf16: an f32 gradient accumulator to the tensor's dtype. The
// tokens [q_tok0, q_tok1) of a tensor [tokens, heads_q, d] (the host sets heads_q and d to
// the tensor's heads and dim), one invocation per element pair, so that a packed word is
// written whole. Both bindings start at token q_tok0. The host prepends params.wgsl,
// mask.wgsl, score_mod.wgsl and the dtype file.

@group(0) @binding(1) var<storage, read> acc: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<Elem>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = (p.q_tok1 - p.q_tok0) * p.heads_q * p.d;
    let i = 2u * (gid.x + gid.y * nwg.x * 64u);
    if i >= total {
        return;
    }
    let both = i + 1u < total;
    let b = select(0.0, acc[i + 1u], both);
    if PACKED {
        dst[i >> 1u] = elem_pair(acc[i], b, both);
    } else {
        dst[i] = elem_of(acc[i]);
        if both { dst[i + 1u] = elem_of(b); }
    }
}
