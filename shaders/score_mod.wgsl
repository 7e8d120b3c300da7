// Score modifications between q.k and the softmax, mirroring core/src/score.rs name for name,
// in the log2 domain (scores are pre-multiplied by log2(e) so that the softmax uses exp2):
// score = softcap(scale * dot) + alibi(i, j).

// softcap(scale * dot) in log2 units: c * tanh(scale * dot / c), or scale * dot when off.
fn softcap(dot: f32) -> f32 {
    if p.softcap_log2 > 0.0 {
        // tanh of a clamped argument: large |x| would overflow exp inside tanh on some drivers.
        return p.softcap_log2 * tanh(clamp(dot * p.scale_over_cap, -15.0, 15.0));
    }
    return dot * p.scale_log2;
}

// d softcap(x) / dx at x = scale * dot: 1 - tanh^2(x / c); 1 when off.
fn softcap_grad(dot: f32) -> f32 {
    if p.softcap_log2 > 0.0 {
        let t = tanh(clamp(dot * p.scale_over_cap, -15.0, 15.0));
        return 1.0 - t * t;
    }
    return 1.0;
}

// The ALiBi bias -slope * |dist|, dist = i + k_len - q_len - j (bottom-right aligned).
fn alibi(slope_log2: f32, dist: i32) -> f32 {
    return -slope_log2 * f32(abs(dist));
}

// ALiBi slope of (batch b, query head h) times log2(e); 0 without ALiBi (`ScoreMod::of`).
fn alibi_slope_log2(b: u32, h: u32) -> f32 {
    if !has_flag(FLAG_ALIBI) {
        return 0.0;
    }
    var i = p.tab_alibi + h;
    if has_flag(FLAG_ALIBI_PER_BATCH) {
        i += b * p.heads_q;
    }
    return bitcast<f32>(tables[i]) * LOG2E;
}

// The score of a raw dot product (`ScoreMod::apply`), in log2 units.
fn score_apply(dot: f32, slope_log2: f32, dist: i32) -> f32 {
    return softcap(dot) + alibi(slope_log2, dist);
}
