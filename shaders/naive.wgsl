// Naive attention, the benchmark's peer: the full score matrix [batch, heads_q, seqlen_q,
// seqlen_k] is materialised in device memory (bound as `part`, f32 bits) by three passes:
// scores = Q K^T (masked, log2 domain), a row softmax in place, out = P V. Dense layout only.
// Score rows (b, h, i) are numbered (b * heads_q + h) * seqlen_q + i; one dispatch group
// covers rows [q_tok0, q_tok1), whose scores are bound from row q_tok0 on (the whole matrix
// may exceed the binding limit). The host prepends the same modules as for flash_fwd.wgsl
// (no tile constants).

@compute @workgroup_size(16, 16)
fn scores(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let row = p.q_tok0 + gid.y + gid.z * 65535u * 16u;
    if row >= p.q_tok1 || j >= p.seqlen_k {
        return;
    }
    let i = row % p.seqlen_q;
    let b = row / p.seqlen_q / p.heads_q;
    let h = (row / p.seqlen_q) % p.heads_q;
    let kh = h / p.group;
    let idx = (row - p.q_tok0) * p.seqlen_k + j;
    let key = i32(j);
    let keys = mask_keys(i32(i), i32(p.seqlen_q), i32(p.seqlen_k));
    if key < keys.start || key >= keys.end {
        part[idx] = NEG_INF_BITS;
        return;
    }
    let qb = ((b * p.seqlen_q + i) * p.heads_q + h) * p.d;
    let kb = ((b * p.seqlen_k + j) * p.heads_kv + kh) * p.d;
    var dot = 0.0;
    for (var e = 0u; e < p.d; e++) {
        dot += ld_q(qb + e) * ld_k(kb + e);
    }
    let diag = i32(i) + i32(p.seqlen_k) - i32(p.seqlen_q);
    part[idx] = bitcast<u32>(score_apply(dot, alibi_slope_log2(b, h), diag - key));
}

var<workgroup> red_max: array<f32, 64>;
var<workgroup> red_sum: array<f32, 64>;

@compute @workgroup_size(64)
fn softmax(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = p.q_tok0 + wid.x + wid.y * nwg.x;
    if row >= p.q_tok1 {
        return; // uniform: the whole workgroup shares `row`
    }
    let base = (row - p.q_tok0) * p.seqlen_k;
    var m = NEG_BIG;
    for (var j = lid; j < p.seqlen_k; j += 64u) {
        let bits = part[base + j];
        if bits != NEG_INF_BITS {
            m = max(m, bitcast<f32>(bits));
        }
    }
    red_max[lid] = m;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if lid < w {
            red_max[lid] = max(red_max[lid], red_max[lid + w]);
        }
        workgroupBarrier();
    }
    m = red_max[0];
    var sum = 0.0;
    for (var j = lid; j < p.seqlen_k; j += 64u) {
        let bits = part[base + j];
        if bits != NEG_INF_BITS {
            sum += exp2(bitcast<f32>(bits) - m);
        }
    }
    red_sum[lid] = sum;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w >>= 1u) {
        if lid < w {
            red_sum[lid] += red_sum[lid + w];
        }
        workgroupBarrier();
    }
    sum = red_sum[0];
    // The sum is exactly 0 only for a fully masked row; a NaN score makes it (and the row) NaN.
    let seen = bitcast<u32>(sum) != 0u;
    let inv = select(select(0.0, 1.0 / sum, seen), sum, is_nan(sum));
    for (var j = lid; j < p.seqlen_k; j += 64u) {
        let bits = part[base + j];
        var pj = 0.0;
        if bits != NEG_INF_BITS {
            pj = exp2(bitcast<f32>(bits) - m) * inv;
        }
        part[base + j] = bitcast<u32>(pj);
    }
    if lid == 0u && has_flag(FLAG_LSE) {
        var bits = select(NEG_INF_BITS, bitcast<u32>((m + log2(sum)) * LN2), seen);
        lse[row] = select(bits, NAN_BITS, is_nan(sum));
    }
}

@compute @workgroup_size(64)
fn pv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = p.batch * p.seqlen_q * p.heads_q * p.dv;
    let e0 = (gid.x + gid.y * nwg.x * 64u) * 2u;
    if e0 >= total {
        return;
    }
    // Elements of rows outside this group are left alone (the host keeps a bf16 word within
    // one row: dv is even there when there are several groups).
    var vals: array<f32, 2>;
    var mine = array<bool, 2>(false, false);
    for (var c = 0u; c < 2u; c++) {
        let e = e0 + c;
        if e < total {
            let x = e % p.dv;
            let h = (e / p.dv) % p.heads_q;
            let tok = e / (p.dv * p.heads_q);
            let b = tok / p.seqlen_q;
            let i = tok % p.seqlen_q;
            let row = (b * p.heads_q + h) * p.seqlen_q + i;
            if row >= p.q_tok0 && row < p.q_tok1 {
                let kh = h / p.group;
                let base = (row - p.q_tok0) * p.seqlen_k;
                var acc = 0.0;
                for (var j = 0u; j < p.seqlen_k; j++) {
                    acc += bitcast<f32>(part[base + j]) * ld_v(((b * p.seqlen_k + j) * p.heads_kv + kh) * p.dv + x);
                }
                vals[c] = acc;
                mine[c] = true;
            }
        }
    }
    if mine[0] {
        st_out_pair(e0, vals[0], vals[1], mine[1]);
    }
}
