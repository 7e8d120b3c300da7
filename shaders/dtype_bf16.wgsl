// bf16 tensors: two elements per u32 word, little-endian (element 2w in the low half of word
// w). Widening is a shift; narrowing rounds to nearest even. See dtype_f32.wgsl.
alias Elem = u32;
const PACKED: bool = true;

fn elem_word(i: u32) -> u32 { return i >> 1u; }

fn elem_get(w: Elem, i: u32) -> f32 {
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));
}

fn to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u { return 0x7fc0u; } // NaN stays NaN
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// Used by unpacked types only.
fn elem_of(x: f32) -> Elem { return to_bf16(x); }

// Elements 2w and 2w + 1 as one word; a lone last element gets a zero partner (buffers are
// padded to whole words).
fn elem_pair(a: f32, b: f32, both: bool) -> Elem {
    return to_bf16(a) | (select(0u, to_bf16(b), both) << 16u);
}
