// What every backward kernel shares (FlashAttention-2's backward, DESIGN.md "Backward"): the
// gradient of one score and the row statistics it needs. Per (query row i, key j):
//   P = exp(score - lse_i), dS = P (dP - delta_i) softcap'(scale q.k), dP = dO_i . v_j,
//   delta_i = dO_i . out_i (fa_bwd_prep), dV_j += P dO_i, dK_j += scale dS q_i, dQ_i += scale dS k_j.
// Every kernel takes the forward's Params (out and lse are inputs here) and, as plain kernel
// arguments, dout, delta (f32, the LSE's layout), the f32 dq accumulator and dq, dk, dv.
// Prepended: params.cuh, dtype.cuh, mask.cuh, score_mod.cuh, warp.cuh.

#define POS_INF __int_as_float(0x7f800000)

// The forward's LSE of a row in log2 units; a row that saw no key (LSE -inf) gets +inf, so that
// every P of it is exp2(-inf) = 0 and its gradients are 0, never NaN. NaN stays NaN.
DEV float lse_log2(float lse) { return lse == NEG_INF ? POS_INF : lse * LOG2E; }

// The score context of one (batch, query head): scale into log2 units (scale log2(e) for plain
// scores, log2(e) when score_mod already scaled them) and the ALiBi slope.
struct GradCtx {
    const Params& p;
    int q_len, k_len;
    float slope;
    float sl2;
    bool has_mod;
};

DEV GradCtx grad_ctx(const Params& p, const SeqBounds& s, int b, int h) {
    const bool has_mod = p.softcap > 0.f || p.alibi != nullptr;
    return GradCtx{p, s.q_len, s.k_len, alibi_slope(p, b, h), has_mod ? LOG2E : p.scale * LOG2E, has_mod};
}

// P and dS of the visible score (i, j) from dot = q_i.k_j and dp = dO_i.v_j; `lse2` and `delta`
// are row i's. dS is left unscaled (dQ and dK take the scale once, at the end).
DEV void grad_of_score(const GradCtx& c, float dot, float dp, int i, int j, float lse2, float delta, float& pr,
                       float& ds) {
    float x = dot, grad = 1.f;
    if (c.has_mod) x = score_mod_grad(c.p, dot, c.slope, i, j, c.q_len, c.k_len, grad);
    pr = exp2f(x * c.sl2 - lse2);
    ds = pr * (dp - delta) * grad;
}

// Tokens of q (and rows of dq, out, dout): batch * seqlen_q, or the varlen total.
DEV int q_tokens(const Params& p) { return p.cu_seqlens_q ? p.seqlen_q : p.batch * p.seqlen_q; }
