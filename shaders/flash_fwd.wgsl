// FlashAttention forward: tiled online softmax, one workgroup per (block of BR query rows,
// query head, sequence x key split). TPR invocations share a query row: each owns DS of its q
// elements and DVS of its output elements, in interleaved pairs (slot s of thread t is element
// 2 * (t + TPR * (s / 2)) + s % 2), so the invocations of a row read neighbouring words of the
// K/V tile and a bf16 output pair is written by one invocation. K and V tiles of BC keys are
// staged in workgroup memory (one buffer, K then V). Scores are in the log2 domain (exp2, scale
// pre-multiplied by log2 e); running max, sum and O are f32; O is divided once at the end.
//
// The host prepends: `enable` lines, the tile constants (WG, TPR, BR, BC, DS, DVS, DP, DVP,
// KVW), common.wgsl and the dtype file (ld_q/ld_k/ld_v/st_out_pair). `//#if SUBGROUPS` blocks
// are kept only where the adapter has subgroup operations.

// Pairs of elements: one 8-byte workgroup load feeds an invocation's two FMAs.
const DP2: u32 = DP / 2u;
const DVP2: u32 = DVP / 2u;
var<workgroup> kv_tile: array<vec2<f32>, BC * KVW / 2u>;
//#if !SUBGROUPS
// Per-invocation partial dot products, summed by the invocations of each row.
var<workgroup> red: array<f32, BR * BC * TPR>;
//#endif

// The partial dot products of one row's TPR invocations summed, in every one of them.
fn row_sum(x: f32, r: u32, j: u32, t: u32) -> f32 {
//#if SUBGROUPS
    var s = x;
    for (var m = 1u; m < TPR; m = m << 1u) {
        s += subgroupShuffleXor(s, m);
    }
    return s;
//#else
    return x; // summed through `red` in the main loop
//#endif
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z / p.num_splits;
    let split = wid.z % p.num_splits;
    let kh = h / p.group;
    let sq = seq_bounds(b);
    let row0 = wid.x * BR;
    // Whole-workgroup exits only (the values are uniform), so barriers stay in uniform flow.
    if row0 >= sq.q_len || sq.q_start + row0 >= p.q_tok1 || sq.q_start + min(row0 + BR, sq.q_len) <= p.q_tok0 {
        return;
    }
    let row_last = min(row0 + BR, sq.q_len) - 1u;

    // Keys any row of this block can see: blocks the mask hides entirely are never loaded.
    // Clamped to the keys bound in this dispatch (tensors beyond the binding limit are chunked).
    let lo = max(key_lo(row0, sq.q_len, sq.k_len), i32(p.k_tok0) - i32(sq.k_start));
    let hi = min(key_hi(row_last, sq.q_len, sq.k_len), i32(p.k_tok1) - i32(sq.k_start));
    // This split's share of the key tiles.
    let n_tiles = (max(hi - lo, 0) + i32(BC) - 1) / i32(BC);
    let per_split = (n_tiles + i32(p.num_splits) - 1) / i32(p.num_splits);
    let t_begin = lo + i32(split) * per_split * i32(BC);
    let t_end = min(hi, t_begin + per_split * i32(BC));

    let r = lid / TPR;
    let t = lid % TPR;
    let i = row0 + r;
    let tok = sq.q_start + i;
    let row_ok = i < sq.q_len && tok >= p.q_tok0 && tok < p.q_tok1;
    let r_lo = max(key_lo(i, sq.q_len, sq.k_len), t_begin);
    let r_hi = min(key_hi(i, sq.q_len, sq.k_len), t_end);
    let slope = alibi_slope_log2(b, h);
    let diag = i32(i) + i32(sq.k_len) - i32(sq.q_len);

    // This invocation's slice of the query row.
    var qv: array<f32, DS>;
    let q_base = ((tok - p.q_tok0) * p.heads_q + h) * p.d;
    for (var s = 0u; s < DS; s++) {
        let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
        qv[s] = select(0.0, ld_q(q_base + e), row_ok && e < p.d);
    }
    var o: array<f32, DVS>;
    var m_run = NEG_BIG;
    var l_run = 0.0;
    var sc: array<f32, BC>;

    for (var kt = t_begin; kt < t_end; kt += i32(BC)) {
        // K tile -> workgroup memory (rows past the end are zeros).
        workgroupBarrier();
        for (var idx = lid; idx < BC * DP2; idx += WG) {
            let j = idx / DP2;
            let e = 2u * (idx % DP2);
            let key = kt + i32(j);
            var x = vec2<f32>(0.0, 0.0);
            if key < t_end && e < p.d {
                let base = ((sq.k_start + u32(key) - p.k_tok0) * p.heads_kv + kh) * p.d + e;
                x.x = ld_k(base);
                if e + 1u < p.d {
                    x.y = ld_k(base + 1u);
                }
            }
            kv_tile[idx] = x;
        }
        workgroupBarrier();

        // S = Q K^T for this row slice, summed over the row's invocations.
        for (var j = 0u; j < BC; j++) {
            var acc = 0.0;
            for (var s = 0u; s < DS; s += 2u) {
                let kk = kv_tile[j * DP2 + t + TPR * (s >> 1u)];
                acc += qv[s] * kk.x + qv[s + 1u] * kk.y;
            }
            sc[j] = row_sum(acc, r, j, t);
        }
//#if !SUBGROUPS
        for (var j = 0u; j < BC; j++) {
            red[(r * BC + j) * TPR + t] = sc[j];
        }
        workgroupBarrier();
        for (var j = 0u; j < BC; j++) {
            var acc = 0.0;
            for (var u = 0u; u < TPR; u++) {
                acc += red[(r * BC + j) * TPR + u];
            }
            sc[j] = acc;
        }
//#endif

        // Online softmax: mask, new max, rescale.
        var m_new = m_run;
        for (var j = 0u; j < BC; j++) {
            let key = kt + i32(j);
            if key >= r_lo && key < r_hi {
                sc[j] = finish_score(sc[j], slope, diag - key);
                m_new = max(m_new, sc[j]);
            }
        }
        let alpha = exp2(m_run - m_new);
        m_run = m_new;
        var l_tile = 0.0;
        for (var j = 0u; j < BC; j++) {
            let key = kt + i32(j);
            var pj = 0.0;
            if key >= r_lo && key < r_hi {
                pj = exp2(sc[j] - m_new);
            }
            sc[j] = pj;
            l_tile += pj;
        }
        l_run = l_run * alpha + l_tile;

        // V tile -> the same workgroup buffer.
        workgroupBarrier();
        for (var idx = lid; idx < BC * DVP2; idx += WG) {
            let j = idx / DVP2;
            let e = 2u * (idx % DVP2);
            let key = kt + i32(j);
            var x = vec2<f32>(0.0, 0.0);
            if key < t_end && e < p.dv {
                let base = ((sq.k_start + u32(key) - p.k_tok0) * p.heads_kv + kh) * p.dv + e;
                x.x = ld_v(base);
                if e + 1u < p.dv {
                    x.y = ld_v(base + 1u);
                }
            }
            kv_tile[idx] = x;
        }
        workgroupBarrier();

        // O = O * alpha + P V.
        for (var s = 0u; s < DVS; s += 2u) {
            let c = t + TPR * (s >> 1u);
            var a0 = o[s] * alpha;
            var a1 = o[s + 1u] * alpha;
            for (var j = 0u; j < BC; j++) {
                let vv = kv_tile[j * DVP2 + c];
                a0 += sc[j] * vv.x;
                a1 += sc[j] * vv.y;
            }
            o[s] = a0;
            o[s + 1u] = a1;
        }
    }

    if !row_ok {
        return;
    }
    // Divide once; a row that saw no key keeps O = 0 and LSE = -inf.
    let inv_l = select(0.0, 1.0 / l_run, l_run > 0.0);
    let lse_bits = select(NEG_INF_BITS, bitcast<u32>((m_run + log2(l_run)) * LN2), l_run > 0.0);
    let row = tok - p.q_tok0;
    if (p.flags & FLAG_PARTIAL) == 0u {
        let o_base = (row * p.heads_q + h) * p.dv;
        for (var s = 0u; s < DVS; s += 2u) {
            let e = 2u * (t + TPR * (s >> 1u));
            if e < p.dv {
                st_out_pair(o_base + e, o[s] * inv_l, o[s + 1u] * inv_l, e + 1u < p.dv);
            }
        }
        if t == 0u && (p.flags & FLAG_LSE) != 0u {
            lse[lse_index(b, h, i, sq.q_start)] = lse_bits;
        }
    } else {
        let pr = ((p.split_base + split) * (p.q_tok1 - p.q_tok0) + row) * p.heads_q + h;
        for (var s = 0u; s < DVS; s++) {
            let e = 2u * (t + TPR * (s >> 1u)) + (s & 1u);
            if e < p.dv {
                part[pr * p.dv + e] = bitcast<u32>(o[s] * inv_l);
            }
        }
        if t == 0u {
            part[p.part_lse + pr] = lse_bits;
        }
    }
}
