// q, k and v in the spec's dtype (bindings 1-3), shared by the forward and backward kernels.
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;

fn ld_q(i: u32) -> f32 { return elem_get(q[elem_word(i)], i); }
fn ld_k(i: u32) -> f32 { return elem_get(k[elem_word(i)], i); }
fn ld_v(i: u32) -> f32 { return elem_get(v[elem_word(i)], i); }
