// f32 tensors: one element per array entry. The host puts this before the kernel's bindings,
// which declare `array<Elem>` and read / write through these helpers.
alias Elem = f32;
// Two elements share one array entry (bf16 only).
const PACKED: bool = false;

fn elem_word(i: u32) -> u32 { return i; }
fn elem_get(w: Elem, i: u32) -> f32 { return w; }
fn elem_of(x: f32) -> Elem { return x; }
// Used by packed types only.
fn elem_pair(a: f32, b: f32, both: bool) -> Elem { return a; }
