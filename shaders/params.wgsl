// The problem description every kernel reads (one uniform per dispatch), the small tables
// that vary per problem, and where a sequence's tokens lie. Mirrors `Params` in
// backends/wgpu/src/params.rs; a test there compares the two layouts through naga.

struct Params {
    batch: u32,
    heads_q: u32,
    heads_kv: u32,
    group: u32,          // heads_q / heads_kv
    seqlen_q: u32,       // dense: per sequence; varlen: total tokens
    seqlen_k: u32,
    d: u32,
    dv: u32,
    scale: f32,
    scale_log2: f32,     // scale * log2(e): scores live in the log2 domain
    scale_over_cap: f32, // scale / softcap
    softcap_log2: f32,   // softcap * log2(e); 0 = off
    win_left: i32,       // -1 = unbounded
    win_right: i32,      // -1 = unbounded (causal folds in as 0)
    flags: u32,          // FLAG_*
    num_splits: u32,     // parallel key splits of a dispatch (split-KV), one partial slot each
    slice_len: u32,      // most keys (backward dK/dV: query rows) a workgroup walks per dispatch
    slice0: u32,         // the slice this dispatch's first split walks
    q_tok0: u32,         // q-side buffers are bound from this token on
    q_tok1: u32,         // tokens from here on belong to another dispatch
    k_tok0: u32,         // k-side buffers are bound from this token on
    k_tok1: u32,
    tab_cu_k: u32,       // offset of cu_seqlens_k in `tables`
    tab_alibi: u32,      // offset of the ALiBi slopes in `tables`
    part_lse: u32,       // offset of the partial LSEs in `part`
    // Decode against a KV cache (FLAG_CACHE; kv_cache.wgsl): position pos of sequence b is
    // cache row tables[tab_pages + b * max_blocks + pos / page_size] * page_size + pos % page_size
    // (a contiguous cache is one page of seqlen_cache rows per sequence).
    seqlen_new: u32,     // rows appended per sequence before attending
    page_size: u32,
    max_blocks: u32,
    tab_pages: u32,      // offset of the block table (contiguous: the cache row of each entry)
    tab_seqlens: u32,    // offset of the rows in use per sequence, before the append
    tab_cos: u32,        // offset of cos [batch, rotary_span, rotary_dim / 2]; sin follows
    rotary_dim: u32,     // 0 = no rotary
    rotary_span: u32,    // positions per sequence in the rotary tables, from its seqlen on
    append_b0: u32,      // the append kernel writes sequences [append_b0, append_b1)
    append_b1: u32,
    // Inputs (q, k, v; the backward's out, dout): element x of head h of token tok (counted
    // over the tensor) of sequence b lies at b * _sb + tok * _ss + h * _sh + x - _at of the
    // binding (wrapping u32; see backends/wgpu/src/strided.rs). Contiguous: _sb = 0,
    // _ss = heads * dim, _sh = dim, _at = the first bound token * _ss.
    q_sb: u32,
    q_ss: u32,
    q_sh: u32,
    q_at: u32,
    k_sb: u32,
    k_ss: u32,
    k_sh: u32,
    k_at: u32,
    v_sb: u32,
    v_ss: u32,
    v_sh: u32,
    v_at: u32,
    out_sb: u32,
    out_ss: u32,
    out_sh: u32,
    out_at: u32,
    dout_sb: u32,
    dout_ss: u32,
    dout_sh: u32,
    dout_at: u32,
}

const FLAG_VARLEN: u32 = 1u;
const FLAG_ALIBI: u32 = 2u;
const FLAG_ALIBI_PER_BATCH: u32 = 4u;
const FLAG_LSE: u32 = 8u;
const FLAG_PARTIAL: u32 = 16u;
// The first dispatch on an accumulator: write it, do not add to what it holds.
const FLAG_FIRST: u32 = 32u;
const FLAG_CACHE: u32 = 64u;
// Rotary pairs (2i, 2i + 1) (GPT-J); else halves (i, i + rotary_dim / 2) (GPT-NeoX).
const FLAG_ROTARY_INTERLEAVED: u32 = 128u;
// q row i takes rotary position seqlen + i (causal or windowed), else seqlen.
const FLAG_ROTARY_Q_POSITIONAL: u32 = 256u;
// A strided input, bound whole (the host keeps its _at at 0; the kernels do not read these).
const FLAG_WHOLE_Q: u32 = 512u;
const FLAG_WHOLE_K: u32 = 1024u;
const FLAG_WHOLE_V: u32 = 2048u;
const FLAG_WHOLE_OUT: u32 = 4096u;
const FLAG_WHOLE_DOUT: u32 = 8192u;

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
const NEG_INF_BITS: u32 = 0xff800000u;
const NAN_BITS: u32 = 0x7fc00000u;
// Running-max start: finite so that exp2(m_old - m_new) is 0, never NaN.
const NEG_BIG: f32 = -3.0e38;

// WGSL lets compilers assume that float arithmetic and comparisons see no NaN (`x != x` and
// `x != 0.0` may be folded), so NaN and exact zero are tested on the bits; and float constants
// cannot be NaN or infinite (browsers reject the shader), so those only ever come from data.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

@group(0) @binding(0) var<uniform> p: Params;
// cu_seqlens_q at 0, cu_seqlens_k at p.tab_cu_k, ALiBi slopes (f32 bits) at p.tab_alibi;
// with a KV cache also the block table, seqlens and rotary tables (offsets above).
@group(0) @binding(5) var<storage, read> tables: array<u32>;

fn has_flag(f: u32) -> bool {
    return (p.flags & f) != 0u;
}

// Where sequence b lies, in tokens (core's `SeqBounds`).
struct SeqBounds {
    q_start: u32,
    q_len: u32,
    k_start: u32,
    k_len: u32,
}

fn seq_bounds(b: u32) -> SeqBounds {
    if has_flag(FLAG_CACHE) {
        // Keys are cache positions, found through the block table (kv_cache.wgsl).
        return SeqBounds(b * p.seqlen_q, p.seqlen_q, 0u, tables[p.tab_seqlens + b] + p.seqlen_new);
    }
    if has_flag(FLAG_VARLEN) {
        let q0 = tables[b];
        let k0 = tables[p.tab_cu_k + b];
        return SeqBounds(q0, tables[b + 1u] - q0, k0, tables[p.tab_cu_k + b + 1u] - k0);
    }
    return SeqBounds(b * p.seqlen_q, p.seqlen_q, b * p.seqlen_k, p.seqlen_k);
}

// Index into the LSE ([batch, heads_q, seqlen_q]; varlen [heads_q, total_q]) of row i of
// sequence b (whose first token is q_start), head h.
fn lse_index(b: u32, h: u32, i: u32, q_start: u32) -> u32 {
    if has_flag(FLAG_VARLEN) {
        return h * p.seqlen_q + q_start + i;
    }
    return (b * p.heads_q + h) * p.seqlen_q + i;
}

// Where head h of token tok (of sequence b) starts in each input's binding (see Params).
fn at_q(b: u32, tok: u32, h: u32) -> u32 { return b * p.q_sb + tok * p.q_ss + h * p.q_sh - p.q_at; }
fn at_k(b: u32, tok: u32, h: u32) -> u32 { return b * p.k_sb + tok * p.k_ss + h * p.k_sh - p.k_at; }
fn at_v(b: u32, tok: u32, h: u32) -> u32 { return b * p.v_sb + tok * p.v_ss + h * p.v_sh - p.v_at; }
fn at_out(b: u32, tok: u32, h: u32) -> u32 {
    return b * p.out_sb + tok * p.out_ss + h * p.out_sh - p.out_at;
}
fn at_dout(b: u32, tok: u32, h: u32) -> u32 {
    return b * p.dout_sb + tok * p.dout_ss + h * p.dout_sh - p.dout_at;
}
