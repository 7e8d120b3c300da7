// Score modifications between q.k and the softmax (core/src/score.rs):
// score(i, j) = softcap(scale * q_i.k_j) + alibi(i, j), softcap(x) = c * tanh(x / c) when c > 0,
// alibi(i, j) = -slope * |i + k_len - q_len - j|.
// Prepended: params.cuh.

// ALiBi slope of (batch b, query head h); 0 without ALiBi (core: AttentionSpec::alibi_slope).
DEV float alibi_slope(const Params& p, int b, int h) {
    if (!p.alibi) return 0.f;
    return p.alibi_per_batch ? p.alibi[b * p.heads_q + h] : p.alibi[h];
}

// Score after scale, softcap and ALiBi, in natural-log units (core: ScoreMod::apply), and in
// `grad` the softcap's derivative d score / d (scale dot) = 1 - tanh^2 (core: softcap_grad; 1
// without softcap) for the backward pass.
DEV float score_mod_grad(const Params& p, float dot, float slope, int i, int j, int q_len, int k_len, float& grad) {
    float x = dot * p.scale;
    grad = 1.f;
    if (p.softcap > 0.f) {
        const float t = tanhf(x / p.softcap);
        x = p.softcap * t;
        grad = 1.f - t * t;
    }
    if (slope != 0.f) x -= slope * fabsf((float)(i + k_len - q_len - j));
    return x;
}

// The score alone (the forward's).
DEV float score_mod(const Params& p, float dot, float slope, int i, int j, int q_len, int k_len) {
    float grad;
    return score_mod_grad(p, dot, slope, i, j, q_len, k_len, grad);
}
