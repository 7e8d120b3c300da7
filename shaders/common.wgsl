// Shared by the flash, combine and naive kernels: the problem description (one uniform) and
// the small tables (cu_seqlens, ALiBi slopes) that vary per problem.

struct Params {
    batch: u32,
    heads_q: u32,
    heads_kv: u32,
    group: u32,        // heads_q / heads_kv
    seqlen_q: u32,     // dense: per sequence; varlen: total tokens
    seqlen_k: u32,
    d: u32,
    dv: u32,
    scale_log2: f32,   // scale * log2(e): scores live in the log2 domain
    scale_over_cap: f32,
    softcap_log2: f32, // softcap * log2(e); 0 = off
    win_left: i32,     // -1 = unbounded
    win_right: i32,    // -1 = unbounded (causal folds in as 0)
    flags: u32,        // FLAG_*
    num_splits: u32,   // key splits per dispatch (split-KV)
    split_base: u32,   // index of this dispatch's first split in `part`
    total_splits: u32, // splits in `part`
    q_tok0: u32,       // q, out and `part` rows are bound from this token on
    q_tok1: u32,       // rows at and after this token belong to another dispatch
    k_tok0: u32,       // k and v are bound from this token on
    k_tok1: u32,
    tab_cu_k: u32,    // offset of cu_seqlens_k in `tables`
    tab_alibi: u32,   // offset of the slopes in `tables`
    part_lse: u32,     // offset of the partial LSEs in `part`
}

const FLAG_VARLEN: u32 = 1u;
const FLAG_ALIBI: u32 = 2u;
const FLAG_ALIBI_PER_BATCH: u32 = 4u;
const FLAG_LSE: u32 = 8u;
const FLAG_PARTIAL: u32 = 16u;

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
const NEG_INF_BITS: u32 = 0xff800000u;
// Running-max start: finite so that exp2(m_old - m_new) is 0, never NaN.
const NEG_BIG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> p: Params;
// cu_seqlens_q at 0, cu_seqlens_k at p.tab_cu_k, ALiBi slopes (f32 bits) at p.tab_alibi.
@group(0) @binding(5) var<storage, read> tables: array<u32>;
// LSE as f32 bits (so -inf can be written): dense [batch, heads_q, seqlen_q], varlen [heads_q, total_q].
@group(0) @binding(6) var<storage, read_write> lse: array<u32>;
// Split-KV partials: O (f32, normalised) [split][row][head][dv], then LSE [split][row][head] at p.part_lse.
@group(0) @binding(7) var<storage, read_write> part: array<u32>;

struct Seq {
    q_start: u32,
    q_len: u32,
    k_start: u32,
    k_len: u32,
}

fn seq_bounds(b: u32) -> Seq {
    if (p.flags & FLAG_VARLEN) != 0u {
        let q0 = tables[b];
        let k0 = tables[p.tab_cu_k + b];
        return Seq(q0, tables[b + 1u] - q0, k0, tables[p.tab_cu_k + b + 1u] - k0);
    }
    return Seq(b * p.seqlen_q, p.seqlen_q, b * p.seqlen_k, p.seqlen_k);
}

// ALiBi slope of (b, h) times log2(e); 0 without ALiBi.
fn alibi_slope_log2(b: u32, h: u32) -> f32 {
    if (p.flags & FLAG_ALIBI) == 0u {
        return 0.0;
    }
    var i = p.tab_alibi + h;
    if (p.flags & FLAG_ALIBI_PER_BATCH) != 0u {
        i += b * p.heads_q;
    }
    return bitcast<f32>(tables[i]) * LOG2E;
}

fn lse_index(b: u32, h: u32, i: u32, q_start: u32) -> u32 {
    if (p.flags & FLAG_VARLEN) != 0u {
        return h * p.seqlen_q + q_start + i;
    }
    return (b * p.heads_q + h) * p.seqlen_q + i;
}

// Visible keys [lo, hi) of row i (bottom-right aligned causal / window), as i32.
fn key_lo(i: u32, q_len: u32, k_len: u32) -> i32 {
    let diag = i32(i) + i32(k_len) - i32(q_len);
    if p.win_left < 0 {
        return 0;
    }
    return max(diag - p.win_left, 0);
}

fn key_hi(i: u32, q_len: u32, k_len: u32) -> i32 {
    let diag = i32(i) + i32(k_len) - i32(q_len);
    if p.win_right < 0 {
        return i32(k_len);
    }
    return clamp(diag + p.win_right + 1, 0, i32(k_len));
}

// Score in the log2 domain: softcap, then ALiBi.
fn finish_score(dot: f32, slope_log2: f32, dist: i32) -> f32 {
    var s = dot * p.scale_log2;
    if p.softcap_log2 > 0.0 {
        // tanh of a clamped argument: large |x| would overflow exp inside tanh on some drivers.
        s = p.softcap_log2 * tanh(clamp(dot * p.scale_over_cap, -15.0, 15.0));
    }
    return s - slope_log2 * f32(abs(dist));
}
