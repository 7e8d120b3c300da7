// Backward, dK and dV: one workgroup per (block of BLOCK_N keys, kv head, sequence), TPR
// invocations per key, each owning DS elements of k / dk and DVS of v / dv (the slot layout of
// flash_fwd.wgsl). It walks the query rows that see its keys (mask_rows_of_keys), of every
// query head that reads its kv head, in a fixed order (head by head, rows ascending), staging
// tiles of BLOCK_M rows of q, dout and their statistics in workgroup memory:
//   s = q.k, p = exp2(score(s) - lse), dv += p dout, dp = dout.v,
//   ds = p (dp - delta) softcap'(s), dk += scale ds q.
// Bounded work: the rows of all the group's heads are numbered g * q_len + i (the virtual
// rows), and one dispatch walks the p.slice_len of them of slice p.slice0. dk and dv accumulate
// in f32 (the tensors themselves for f32): the first dispatch of a key range writes them
// (FLAG_FIRST), later ones add, always in the same order, so the result is bitwise
// reproducible without atomics.
//
// The host prepends the tile constants, params.wgsl, mask.wgsl, score_mod.wgsl, the dtype
// file, io_qkv.wgsl, io_backward.wgsl and row_reduce.wgsl.

const RED_ROWS: u32 = BLOCK_N;
const RED_N: u32 = BLOCK_M;
const DP2: u32 = DP / 2u;
const DVP2: u32 = DVP / 2u;
var<workgroup> q_tile: array<vec2<f32>, BLOCK_M * DP2>;
var<workgroup> do_tile: array<vec2<f32>, BLOCK_M * DVP2>;
var<workgroup> stats_tile: array<vec2<f32>, BLOCK_M>;

@group(0) @binding(7) var<storage, read_write> dk_acc: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv_acc: array<f32>;

// This invocation's slices of k, v, dk and dv, and the current tile's p (then ds) and dp.
var<private> k_slice: array<f32, DS>;
var<private> v_slice: array<f32, DVS>;
var<private> dk: array<f32, DS>;
var<private> dv: array<f32, DVS>;
var<private> p_tile: array<f32, BLOCK_M>;
var<private> dp_tile: array<f32, BLOCK_M>;

// One workgroup's keys (uniform across the workgroup).
struct KeyBlock {
    b: u32,
    kh: u32,
    seq: SeqBounds,
    key0: u32,
    keys: Span,  // the block's keys within the sequence
    rows: Span,  // the rows that see any of them, bound in this dispatch
}

// One invocation's key.
struct Key {
    j: i32,
    tok: u32,
    ok: bool,    // a key of the sequence bound in this dispatch
    rows: Span,  // the rows that see it, among the block's
}

fn key_block(wid: vec3<u32>) -> KeyBlock {
    let seq = seq_bounds(wid.z);
    let key0 = wid.x * BLOCK_N;
    let keys = Span(i32(key0), i32(min(key0 + BLOCK_N, seq.k_len)));
    let bound = Span(i32(p.q_tok0) - i32(seq.q_start), i32(p.q_tok1) - i32(seq.q_start));
    let rows = span_and(mask_rows_of_keys(keys, i32(seq.q_len), i32(seq.k_len)), bound);
    return KeyBlock(wid.z, wid.y, seq, key0, keys, rows);
}

// Whether any key of the block lies in this dispatch's key tokens.
fn key_block_active(blk: KeyBlock) -> bool {
    let first = blk.seq.k_start + blk.key0;
    let end = blk.seq.k_start + u32(max(blk.keys.end, blk.keys.start));
    return blk.keys.start < blk.keys.end && first < p.k_tok1 && end > p.k_tok0;
}

fn key_of(blk: KeyBlock, r: u32) -> Key {
    let j = blk.key0 + r;
    let tok = blk.seq.k_start + j;
    let ok = j < blk.seq.k_len && tok >= p.k_tok0 && tok < p.k_tok1;
    let rows = span_and(mask_rows(i32(j), i32(blk.seq.q_len), i32(blk.seq.k_len)), blk.rows);
    return Key(i32(j), tok, ok, rows);
}

fn load_key(key: Key, b: u32, kh: u32, t: u32) {
    let k_base = at_k(b, key.tok, kh);
    for (var s = 0u; s < DS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        k_slice[s] = select(0.0, ld_k(k_base + e), key.ok && e < p.d);
        dk[s] = 0.0;
    }
    let v_base = at_v(b, key.tok, kh);
    for (var s = 0u; s < DVS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        v_slice[s] = select(0.0, ld_v(v_base + e), key.ok && e < p.dv);
        dv[s] = 0.0;
    }
}

// Elements e and e + 1 of head h's row i of q (of dout when `is_dout`); zeros from row `end`
// on and past the row.
fn row_pair(blk: KeyBlock, h: u32, i: i32, end: i32, e: u32, is_dout: bool) -> vec2<f32> {
    let width = select(p.d, p.dv, is_dout);
    if i >= end || e >= width {
        return vec2<f32>(0.0, 0.0);
    }
    let tok = blk.seq.q_start + u32(i);
    if is_dout {
        let base = at_dout(blk.b, tok, h) + e;
        return vec2<f32>(ld_dout(base), select(0.0, ld_dout(base + 1u), e + 1u < width));
    }
    let base = at_q(blk.b, tok, h) + e;
    return vec2<f32>(ld_q(base), select(0.0, ld_q(base + 1u), e + 1u < width));
}

// Stages q, dout and the statistics of head h's rows [i0, i0 + BLOCK_M) (zeros past `end`).
fn stage_rows(blk: KeyBlock, h: u32, i0: i32, end: i32, lid: u32) {
    workgroupBarrier(); // the previous tile's readers are done
    for (var idx = lid; idx < BLOCK_M * DP2; idx += WG) {
        q_tile[idx] = row_pair(blk, h, i0 + i32(idx / DP2), end, 2u * (idx % DP2), false);
    }
    for (var idx = lid; idx < BLOCK_M * DVP2; idx += WG) {
        do_tile[idx] = row_pair(blk, h, i0 + i32(idx / DVP2), end, 2u * (idx % DVP2), true);
    }
    for (var m = lid; m < BLOCK_M; m += WG) {
        let i = i0 + i32(m);
        var st = vec2<f32>(0.0, 0.0);
        if i < end {
            st = stats[(blk.seq.q_start + u32(i) - p.q_tok0) * p.heads_q + h];
        }
        stats_tile[m] = st;
    }
    workgroupBarrier();
}

// s = q.k (into p_tile) and dp = dout.v for the tile's rows, summed over the key's invocations.
fn tile_dots(r: u32, t: u32) {
    for (var m = 0u; m < BLOCK_M; m++) {
        var s_acc = 0.0;
        for (var s = 0u; s < DS; s += 2u) {
            let qq = q_tile[m * DP2 + t + TPR * (s >> 1u)];
            s_acc += k_slice[s] * qq.x + k_slice[s + 1u] * qq.y;
        }
        var dp_acc = 0.0;
        for (var s = 0u; s < DVS; s += 2u) {
            let oo = do_tile[m * DVP2 + t + TPR * (s >> 1u)];
            dp_acc += v_slice[s] * oo.x + v_slice[s + 1u] * oo.y;
        }
        p_tile[m] = s_acc;
        dp_tile[m] = dp_acc;
    }
    row_sum_all(&p_tile, r, t);
    row_sum_all(&dp_tile, r, t);
}

// p_tile becomes p and dp_tile ds, 0 outside `rows` (the walked rows that see the key).
fn tile_p_ds(i0: i32, key: Key, rows: Span, blk: KeyBlock, slope: f32) {
    let shift = i32(blk.seq.k_len) - i32(blk.seq.q_len);
    for (var m = 0u; m < BLOCK_M; m++) {
        let i = i0 + i32(m);
        var pm = 0.0;
        var ds = 0.0;
        if i >= rows.start && i < rows.end {
            let s = p_tile[m];
            let st = stats_tile[m];
            pm = exp2(score_apply(s, slope, i + shift - key.j) - st.x);
            ds = pm * (dp_tile[m] - st.y) * softcap_grad(s);
        }
        p_tile[m] = pm;
        dp_tile[m] = ds;
    }
}

// dv += p dout and dk += ds q over the tile (`guarded`: rows this key does not see are skipped
// rather than multiplied by 0, so that a NaN it does not see stays out).
fn add_dk_dv(t: u32, i0: i32, rows: Span, guarded: bool) {
    for (var s = 0u; s < DVS; s += 2u) {
        let c = t + TPR * (s >> 1u);
        var a0 = dv[s];
        var a1 = dv[s + 1u];
        for (var m = 0u; m < BLOCK_M; m++) {
            let i = i0 + i32(m);
            if !guarded || (i >= rows.start && i < rows.end) {
                let oo = do_tile[m * DVP2 + c];
                a0 += p_tile[m] * oo.x;
                a1 += p_tile[m] * oo.y;
            }
        }
        dv[s] = a0;
        dv[s + 1u] = a1;
    }
    for (var s = 0u; s < DS; s += 2u) {
        let c = t + TPR * (s >> 1u);
        var a0 = dk[s];
        var a1 = dk[s + 1u];
        for (var m = 0u; m < BLOCK_M; m++) {
            let i = i0 + i32(m);
            if !guarded || (i >= rows.start && i < rows.end) {
                let qq = q_tile[m * DP2 + c];
                a0 += dp_tile[m] * qq.x;
                a1 += dp_tile[m] * qq.y;
            }
        }
        dk[s] = a0;
        dk[s + 1u] = a1;
    }
}

// dk * scale and dv into the accumulators: written by the first dispatch, added to by later ones.
fn store_dk_dv(key: Key, kh: u32, t: u32) {
    let first = has_flag(FLAG_FIRST);
    if !key.ok {
        return;
    }
    let k_base = ((key.tok - p.k_tok0) * p.heads_kv + kh) * p.d;
    for (var s = 0u; s < DS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        if e < p.d {
            dk_acc[k_base + e] = select(dk_acc[k_base + e], 0.0, first) + p.scale * dk[s];
        }
    }
    let v_base = ((key.tok - p.k_tok0) * p.heads_kv + kh) * p.dv;
    for (var s = 0u; s < DVS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        if e < p.dv {
            dv_acc[v_base + e] = select(dv_acc[v_base + e], 0.0, first) + dv[s];
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = key_block(wid);
    // Whole-workgroup exits only (the values are uniform), so barriers stay in uniform flow.
    if !key_block_active(blk) {
        return;
    }
    let r = lid / TPR;
    let t = lid % TPR;
    let key = key_of(blk, r);
    load_key(key, blk.b, blk.kh, t);
    let ql = i32(blk.seq.q_len);
    let kl = i32(blk.seq.k_len);
    // Rows every key of the block sees (both ends grow with the key): tiles inside need no guard.
    let all_see = Span(mask_rows(blk.keys.end - 1, ql, kl).start, mask_rows(blk.keys.start, ql, kl).end);
    // This dispatch's virtual rows g * q_len + i.
    let v0 = i32(p.slice0 * p.slice_len);
    let v1 = v0 + i32(p.slice_len);
    // Only the heads whose rows meet the slice: at most slice_len / q_len + 2 of them.
    let g_end = min(i32(p.group), (v1 + ql - 1) / max(ql, 1));
    for (var g = v0 / max(ql, 1); g < g_end && ql > 0; g++) {
        let walked = span_and(blk.rows, Span(v0 - g * ql, v1 - g * ql));
        let h = blk.kh * p.group + u32(g);
        let slope = alibi_slope_log2(blk.b, h);
        let seen = span_and(key.rows, walked);
        for (var i0 = walked.start; i0 < walked.end; i0 += i32(BLOCK_M)) {
            stage_rows(blk, h, i0, walked.end, lid);
            tile_dots(r, t);
            tile_p_ds(i0, key, seen, blk, slope);
            let tile_end = min(i0 + i32(BLOCK_M), walked.end);
            add_dk_dv(t, i0, seen, i0 < all_see.start || tile_end > all_see.end);
        }
    }
    store_dk_dv(key, blk.kh, t);
}
