// Backward, dQ: one workgroup per (block of BLOCK_M query rows, query head, sequence), TPR
// invocations per row with the slot layout of flash_fwd.wgsl. It walks the keys its rows see
// (at most p.slice_len of them per dispatch), K and V tiles of BLOCK_N keys staged in
// workgroup memory, and recomputes P from the forward's LSE:
//   s = q.k, p = exp2(score(s) - lse), dp = dout.v, ds = p (dp - delta) softcap'(s),
//   dq = scale * sum ds k.
// dq accumulates in f32 (`dq_acc`, the dq tensor itself for f32): the first dispatch of a
// query range writes it (FLAG_FIRST), later ones add, always in the same order, so the result
// is bitwise reproducible. WGSL has no float atomics, and none are needed.
//
// The host prepends the tile constants, params.wgsl, mask.wgsl, score_mod.wgsl, the dtype
// file, io_qkv.wgsl, io_backward.wgsl, row_reduce.wgsl and query_block.wgsl.

const RED_ROWS: u32 = BLOCK_M;
const RED_N: u32 = BLOCK_N;
const DP2: u32 = DP / 2u;
const DVP2: u32 = DVP / 2u;
var<workgroup> k_tile: array<vec2<f32>, BLOCK_N * DP2>;
var<workgroup> v_tile: array<vec2<f32>, BLOCK_N * DVP2>;

@group(0) @binding(7) var<storage, read_write> dq_acc: array<f32>;

// This invocation's slices (beside q_slice) of dout and dq, and the current tile's s (then
// ds) and dp.
var<private> do_slice: array<f32, DVS>;
var<private> dq: array<f32, DS>;
var<private> s_tile: array<f32, BLOCK_N>;
var<private> dp_tile: array<f32, BLOCK_N>;

fn load_row(row: Row, h: u32, t: u32) {
    load_q(row, h, t);
    for (var s = 0u; s < DS; s++) {
        dq[s] = 0.0;
    }
    let o_base = at_dout(row.b, row.tok, h);
    for (var s = 0u; s < DVS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        do_slice[s] = select(0.0, ld_dout(o_base + e), row.ok && e < p.dv);
    }
}

// Elements e and e + 1 of key `key`'s k row (v row when `is_v`); zeros past the block's keys
// and past the row.
fn kv_pair(blk: Block, key: i32, e: u32, is_v: bool) -> vec2<f32> {
    let width = select(p.d, p.dv, is_v);
    if key >= blk.keys.end || e >= width {
        return vec2<f32>(0.0, 0.0);
    }
    let tok = blk.seq.k_start + u32(key);
    if is_v {
        let base = at_v(blk.b, tok, blk.kh) + e;
        return vec2<f32>(ld_v(base), select(0.0, ld_v(base + 1u), e + 1u < width));
    }
    let base = at_k(blk.b, tok, blk.kh) + e;
    return vec2<f32>(ld_k(base), select(0.0, ld_k(base + 1u), e + 1u < width));
}

// Stages K and V of keys [kt, kt + BLOCK_N) (zeros past the block's keys).
fn stage_kv(blk: Block, kt: i32, lid: u32) {
    workgroupBarrier(); // the previous tile's readers are done
    for (var idx = lid; idx < BLOCK_N * DP2; idx += WG) {
        k_tile[idx] = kv_pair(blk, kt + i32(idx / DP2), 2u * (idx % DP2), false);
    }
    for (var idx = lid; idx < BLOCK_N * DVP2; idx += WG) {
        v_tile[idx] = kv_pair(blk, kt + i32(idx / DVP2), 2u * (idx % DVP2), true);
    }
    workgroupBarrier();
}

// s = q.k and dp = dout.v for the tile's keys, summed over the row's invocations.
fn tile_dots(r: u32, t: u32) {
    for (var j = 0u; j < BLOCK_N; j++) {
        var s_acc = 0.0;
        for (var s = 0u; s < DS; s += 2u) {
            let kk = k_tile[j * DP2 + t + TPR * (s >> 1u)];
            s_acc += q_slice[s] * kk.x + q_slice[s + 1u] * kk.y;
        }
        var dp_acc = 0.0;
        for (var s = 0u; s < DVS; s += 2u) {
            let vv = v_tile[j * DVP2 + t + TPR * (s >> 1u)];
            dp_acc += do_slice[s] * vv.x + do_slice[s + 1u] * vv.y;
        }
        s_tile[j] = s_acc;
        dp_tile[j] = dp_acc;
    }
    row_sum_all(&s_tile, r, t);
    row_sum_all(&dp_tile, r, t);
}

// s_tile becomes ds = p (dp - delta) softcap'(s); 0 where the row does not see the key.
fn tile_ds(kt: i32, row: Row, stats_row: vec2<f32>) {
    for (var j = 0u; j < BLOCK_N; j++) {
        let key = kt + i32(j);
        var ds = 0.0;
        if key >= row.keys.start && key < row.keys.end {
            let s = s_tile[j];
            let pj = exp2(score_apply(s, row.slope, row.diag - key) - stats_row.x);
            ds = pj * (dp_tile[j] - stats_row.y) * softcap_grad(s);
        }
        s_tile[j] = ds;
    }
}

// dq += ds k over the tile (`guarded`: see tile_guarded).
fn add_dq(t: u32, kt: i32, keys: Span, guarded: bool) {
    for (var s = 0u; s < DS; s += 2u) {
        let c = t + TPR * (s >> 1u);
        var a0 = dq[s];
        var a1 = dq[s + 1u];
        for (var j = 0u; j < BLOCK_N; j++) {
            let key = kt + i32(j);
            if !guarded || (key >= keys.start && key < keys.end) {
                let kk = k_tile[j * DP2 + c];
                a0 += s_tile[j] * kk.x;
                a1 += s_tile[j] * kk.y;
            }
        }
        dq[s] = a0;
        dq[s + 1u] = a1;
    }
}

// dq * scale into the accumulator: written by the first dispatch, added to by later ones.
fn store_dq(row: Row, h: u32, t: u32) {
    let first = has_flag(FLAG_FIRST);
    if !row.ok || !(first || row.keys.start < row.keys.end) {
        return;
    }
    let base = ((row.tok - p.q_tok0) * p.heads_q + h) * p.d;
    for (var s = 0u; s < DS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        if e < p.d {
            let prev = select(dq_acc[base + e], 0.0, first);
            dq_acc[base + e] = prev + p.scale * dq[s];
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = block_of(wid);
    // Whole-workgroup exits only (the values are uniform), so barriers stay in uniform flow.
    if !block_active(blk) {
        return;
    }
    let r = lid / TPR;
    let t = lid % TPR;
    let row = row_of(blk, r);
    load_row(row, blk.h, t);
    var stats_row = vec2<f32>(0.0, 0.0);
    if row.ok {
        stats_row = stats[(row.tok - p.q_tok0) * p.heads_q + blk.h];
    }
    let all_see = keys_all_rows_see(blk);
    for (var kt = blk.keys.start; kt < blk.keys.end; kt += i32(BLOCK_N)) {
        stage_kv(blk, kt, lid);
        tile_dots(r, t);
        tile_ds(kt, row, stats_row);
        add_dq(t, kt, row.keys, tile_guarded(blk, all_see, kt));
    }
    store_dq(row, blk.h, t);
}
