// Element access for bf16 tensors: two bf16 per u32 word, little-endian (element 2w in the
// low half of word w). Widening is a shift; narrowing rounds to nearest even.
@group(0) @binding(1) var<storage, read> q: array<u32>;
@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

fn bf16_at(word: u32, i: u32) -> f32 {
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
}

fn ld_q(i: u32) -> f32 { return bf16_at(q[i >> 1u], i); }
fn ld_k(i: u32) -> f32 { return bf16_at(k[i >> 1u], i); }
fn ld_v(i: u32) -> f32 { return bf16_at(v[i >> 1u], i); }

fn to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u { return 0x7fc0u; } // NaN stays NaN
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// Stores elements i and i + 1 (i even) as one word; a lone last element gets a zero partner
// (the buffer is padded to whole words).
fn st_out_pair(i: u32, a: f32, b: f32, both: bool) {
    let hi = select(0u, to_bf16(b), both);
    out[i >> 1u] = to_bf16(a) | (hi << 16u);
}
