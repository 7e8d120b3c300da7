// The forward's outputs (flash, combine and naive kernels): out in the output dtype, the LSE
// and the split-KV partials.
@group(0) @binding(4) var<storage, read_write> out: array<Elem>;
// LSE as f32 bits (so -inf can be written): dense [batch, heads_q, seqlen_q], varlen [heads_q, total_q].
@group(0) @binding(6) var<storage, read_write> lse: array<u32>;
// Split-KV partials, f32 bits: O (normalised) [slot][row][head][dv], then LSE [slot][row][head]
// at p.part_lse. The naive kernels bind their score matrix here.
@group(0) @binding(7) var<storage, read_write> part: array<u32>;

// Stores elements i and i + 1 (i even; the second only when `both`), so that a packed word is
// written whole by one invocation.
fn st_out_pair(i: u32, a: f32, b: f32, both: bool) {
    if PACKED {
        out[i >> 1u] = elem_pair(a, b, both);
    } else {
        out[i] = elem_of(a);
        if both { out[i + 1u] = elem_of(b); }
    }
}
