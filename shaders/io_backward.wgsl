// The backward kernels' inputs beyond q, k, v: dout in the output dtype and the per-row
// statistics of bwd_prep.wgsl, (LSE * log2(e), delta = rowsum(dout * out)) per (token, head)
// of the bound query range.
@group(0) @binding(4) var<storage, read> dout: array<Elem>;
@group(0) @binding(6) var<storage, read> stats: array<vec2<f32>>;

fn ld_dout(i: u32) -> f32 { return elem_get(dout[elem_word(i)], i); }
