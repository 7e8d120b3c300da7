// f16 tensors (needs SHADER_F16): one element per array entry. See dtype_f32.wgsl.
enable f16;

alias Elem = f16;
const PACKED: bool = false;

fn elem_word(i: u32) -> u32 { return i; }
fn elem_get(w: Elem, i: u32) -> f32 { return f32(w); }
fn elem_of(x: f32) -> Elem { return f16(x); }
// Used by packed types only.
fn elem_pair(a: f32, b: f32, both: bool) -> Elem { return f16(a); }
