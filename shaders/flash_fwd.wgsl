// FlashAttention forward: tiled online softmax, one workgroup per (block of BLOCK_M query
// rows, query head, sequence x key split). TPR invocations share a query row: each owns DS of
// its q elements and DVS of its output elements, in interleaved pairs (slot s of invocation t
// is element 2 * (t + TPR * (s / 2)) + s % 2), so the invocations of a row read neighbouring
// words of the K/V tile and a packed output pair is written by one invocation. K and V tiles
// of BLOCK_N keys are staged in workgroup memory (one buffer, K then V). Scores are in the log2
// domain; running max, sum and O are f32; O is divided once at the end.
//
// Bounded work: a workgroup walks at most p.slice_len keys per dispatch, those of slice
// p.slice0 + split of its sequence. Longer key ranges take several dispatches whose partial
// (O, LSE) accumulate in the split's slot of `part` (FLAG_PARTIAL), merged by combine.wgsl.
//
// Decode (the DECODE variant, FLAG_CACHE): k and v are the KV cache, keys are found through
// its block table (kv_cache.wgsl), a block packs the query heads of one KV head
// (query_block.wgsl) and q is rotated as it is loaded.
//
// The host prepends the `enable` lines, the tile constants (WG, TPR, BLOCK_M, BLOCK_N, DS,
// DVS, DP, DVP, KVW), params.wgsl, mask.wgsl, score_mod.wgsl, the dtype file, io_qkv.wgsl,
// io_forward.wgsl, row_reduce.wgsl and query_block.wgsl.

const RED_ROWS: u32 = BLOCK_M;
const RED_N: u32 = BLOCK_N;
// Pairs of elements: one 8-byte workgroup load feeds an invocation's two FMAs.
const DP2: u32 = DP / 2u;
const DVP2: u32 = DVP / 2u;
var<workgroup> kv_tile: array<vec2<f32>, BLOCK_N * KVW / 2u>;

// This invocation's state (beside q_slice): its O slice, the scores of the current tile, and
// the running max and sum of its row.
var<private> o_acc: array<f32, DVS>;
var<private> scores: array<f32, BLOCK_N>;
var<private> m_run: f32;
var<private> l_run: f32;

// Stages keys [kt, kt + BLOCK_N) of the block's kv head in kv_tile, K (is_v false, width d)
// or V (width dv) as element pairs; keys past the block's span are zeros.
fn stage_tile(blk: Block, kt: i32, lid: u32, is_v: bool) {
    let width = select(p.d, p.dv, is_v);
    let pairs = select(DP2, DVP2, is_v);
    workgroupBarrier(); // the previous tile's readers are done
    for (var idx = lid; idx < BLOCK_N * pairs; idx += WG) {
        let j = idx / pairs;
        let e = 2u * (idx % pairs);
        let key = kt + i32(j);
        var x = vec2<f32>(0.0, 0.0);
        if key < blk.keys.end && e < width {
//#if DECODE
            let base = (cache_row(blk.b, u32(key)) * p.heads_kv + blk.kh) * width + e;
//#else
            let tok = blk.seq.k_start + u32(key);
            var base = at_k(blk.b, tok, blk.kh) + e;
            if is_v {
                base = at_v(blk.b, tok, blk.kh) + e;
            }
//#endif
            if is_v {
                x = vec2<f32>(ld_v(base), select(0.0, ld_v(base + 1u), e + 1u < width));
            } else {
                x = vec2<f32>(ld_k(base), select(0.0, ld_k(base + 1u), e + 1u < width));
            }
        }
        kv_tile[idx] = x;
    }
    workgroupBarrier();
}

// S = Q K^T of the staged tile for this invocation's slice, summed over the row's invocations.
fn tile_scores(r: u32, t: u32) {
    for (var j = 0u; j < BLOCK_N; j++) {
        var acc = 0.0;
        for (var s = 0u; s < DS; s += 2u) {
            let kk = kv_tile[j * DP2 + t + TPR * (s >> 1u)];
            acc += q_slice[s] * kk.x + q_slice[s + 1u] * kk.y;
        }
        scores[j] = acc;
    }
    row_sum_all(&scores, r, t);
}

// Online softmax over one tile: score mod and mask, the new running max, p = exp2(s - max)
// (0 for masked keys), the rescaled sum. Returns the factor that rescales O.
fn softmax_step(kt: i32, row: Row) -> f32 {
    var m_new = m_run;
    for (var j = 0u; j < BLOCK_N; j++) {
        let key = kt + i32(j);
        if key >= row.keys.start && key < row.keys.end {
            scores[j] = score_apply(scores[j], row.slope, row.diag - key);
            m_new = max(m_new, scores[j]);
        }
    }
    let alpha = exp2(m_run - m_new);
    m_run = m_new;
    var l_tile = 0.0;
    for (var j = 0u; j < BLOCK_N; j++) {
        let key = kt + i32(j);
        var pj = 0.0;
        if key >= row.keys.start && key < row.keys.end {
            pj = exp2(scores[j] - m_new);
        }
        scores[j] = pj;
        l_tile += pj;
    }
    l_run = l_run * alpha + l_tile;
    return alpha;
}

// O = O * alpha + P V for this invocation's output slice (`guarded`: see tile_guarded).
fn add_pv(alpha: f32, t: u32, kt: i32, keys: Span, guarded: bool) {
    for (var s = 0u; s < DVS; s += 2u) {
        let c = t + TPR * (s >> 1u);
        var a0 = o_acc[s] * alpha;
        var a1 = o_acc[s + 1u] * alpha;
        if guarded {
            for (var j = 0u; j < BLOCK_N; j++) {
                let key = kt + i32(j);
                if key >= keys.start && key < keys.end {
                    let vv = kv_tile[j * DVP2 + c];
                    a0 += scores[j] * vv.x;
                    a1 += scores[j] * vv.y;
                }
            }
        } else {
            for (var j = 0u; j < BLOCK_N; j++) {
                let vv = kv_tile[j * DVP2 + c];
                a0 += scores[j] * vv.x;
                a1 += scores[j] * vv.y;
            }
        }
        o_acc[s] = a0;
        o_acc[s + 1u] = a1;
    }
}

// Whether the row saw any key: its sum is exactly +0 only when it saw none (a NaN sum did).
fn row_seen() -> bool {
    return bitcast<u32>(l_run) != 0u;
}

// The row's LSE (natural log, f32 bits) from the running max and sum: -inf when it saw no
// key, NaN when a score was NaN.
fn row_lse_bits() -> u32 {
    if is_nan(l_run) {
        return NAN_BITS;
    }
    return select(NEG_INF_BITS, bitcast<u32>((m_run + log2(l_run)) * LN2), row_seen());
}

// 1 / sum: 0 when the row saw no key (O stays 0), NaN when its sum is NaN (the sum itself:
// WGSL constants cannot be NaN, so NaN is always a runtime value here).
fn inv_sum() -> f32 {
    if is_nan(l_run) {
        return l_run;
    }
    return select(0.0, 1.0 / l_run, row_seen());
}

// Writes out (in the output dtype) and the LSE directly: a single dispatch covered the keys.
fn store_out(blk: Block, row: Row, t: u32) {
    let inv_l = inv_sum();
    let o_base = ((row.tok - p.q_tok0) * p.heads_q + row.h) * p.dv;
    for (var s = 0u; s < DVS; s += 2u) {
        let e = 2u * (t + TPR * (s >> 1u));
        if e < p.dv {
            st_out_pair(o_base + e, o_acc[s] * inv_l, o_acc[s + 1u] * inv_l, e + 1u < p.dv);
        }
    }
    if t == 0u && has_flag(FLAG_LSE) {
        lse[lse_index(blk.b, row.h, row.i, blk.seq.q_start)] = row_lse_bits();
    }
}

// Index of (split slot, row, head) in the partials.
fn slot_index(blk: Block, row: Row) -> u32 {
    return (blk.split * (p.q_tok1 - p.q_tok0) + row.tok - p.q_tok0) * p.heads_q + row.h;
}

// The LSE bits this row's slot holds from earlier dispatches (-inf when there are none).
fn slot_lse_bits(blk: Block, row: Row) -> u32 {
    if !row.ok || has_flag(FLAG_FIRST) {
        return NEG_INF_BITS;
    }
    return part[p.part_lse + slot_index(blk, row)];
}

// Merges this dispatch's (O, LSE) into the row's slot: weights exp(lse - max) of the two, as
// combine.wgsl merges slots. The first dispatch writes the slot even when it saw no key.
fn store_slot(blk: Block, row: Row, t: u32, prev_bits: u32) {
    if !row.ok || !(row_seen() || has_flag(FLAG_FIRST)) {
        return;
    }
    let pr = slot_index(blk, row);
    let prev_lse = bitcast<f32>(prev_bits);
    let lse_cur = bitcast<f32>(row_lse_bits());
    var w_prev = 0.0;
    var w_cur = inv_sum();
    var lse_new = lse_cur;
    if is_nan(prev_lse) || is_nan(lse_cur) {
        w_cur = prev_lse + lse_cur; // NaN, as a runtime value
        lse_new = w_cur;
    } else if prev_bits != NEG_INF_BITS {
        // Both saw keys.
        let m = max(prev_lse, lse_cur);
        let a = exp(prev_lse - m);
        let c = exp(lse_cur - m);
        w_prev = a / (a + c);
        w_cur = c / (a + c) * inv_sum();
        lse_new = m + log(a + c);
    }
    for (var s = 0u; s < DVS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        if e < p.dv {
            let at = pr * p.dv + e;
            let prev = select(0.0, bitcast<f32>(part[at]), bitcast<u32>(w_prev) != 0u);
            part[at] = bitcast<u32>(w_prev * prev + w_cur * o_acc[s]);
        }
    }
    if t == 0u {
        part[p.part_lse + pr] = bitcast<u32>(lse_new);
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
    load_q(row, row.h, t);
    m_run = NEG_BIG;
    l_run = 0.0;
    for (var s = 0u; s < DVS; s++) {
        o_acc[s] = 0.0;
    }
    let all_see = keys_all_rows_see(blk);
    for (var kt = blk.keys.start; kt < blk.keys.end; kt += i32(BLOCK_N)) {
        stage_tile(blk, kt, lid, false);
        tile_scores(r, t);
        let alpha = softmax_step(kt, row);
        stage_tile(blk, kt, lid, true);
        add_pv(alpha, t, kt, row.keys, tile_guarded(blk, all_see, kt));
    }
    if has_flag(FLAG_PARTIAL) {
        let prev_bits = slot_lse_bits(blk, row);
        workgroupBarrier(); // every invocation of a row has read the slot's LSE
        store_slot(blk, row, t, prev_bits);
    } else if row.ok {
        store_out(blk, row, t);
    }
}
