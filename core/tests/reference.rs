//! The reference against cases whose answers follow from the definition by hand.

mod common;

use flashattn_core::AttentionSpec;

fn run(spec: &AttentionSpec, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let r = common::reference_f32(spec, q, k, v);
    (r.out, r.lse)
}

#[test]
fn one_key_returns_its_value() {
    let s = AttentionSpec::new(1, 1, 1, 1, 2);
    let (o, lse) = run(&s, &[0.3, -0.7], &[1.0, 2.0], &[5.0, -3.0]);
    assert_eq!(o, vec![5.0, -3.0]);
    let score = (0.3 - 1.4) / 2f64.sqrt();
    assert!((lse[0] - score).abs() < 1e-6);
}

#[test]
fn softmax_weights_follow_the_scores() {
    // Two keys with scores 0 and ln 3 (scale 1): weights 1/4 and 3/4.
    let s = AttentionSpec::new(1, 1, 1, 2, 1).scale(1.0);
    let (o, lse) = run(&s, &[1.0], &[0.0, 3f32.ln()], &[4.0, 8.0]);
    assert!((o[0] - 7.0).abs() < 1e-6, "{o:?}");
    assert!((lse[0] - 4f64.ln()).abs() < 1e-6);
}

#[test]
fn causal_is_bottom_right_aligned_and_masked_rows_are_zero() {
    // sq = 3 > sk = 2: row 0 sees nothing (j <= 0 + 2 - 3 = -1), row 1 sees key 0, row 2 both.
    let s = AttentionSpec::new(1, 1, 3, 2, 1).causal(true).scale(1.0);
    let (o, lse) = run(&s, &[0.0, 0.0, 0.0], &[0.0, 0.0], &[2.0, 6.0]);
    assert_eq!(o, vec![0.0, 2.0, 4.0]);
    assert_eq!(lse[0], f64::NEG_INFINITY);
    assert!((lse[2] - 2f64.ln()).abs() < 1e-9);
}

#[test]
fn window_alibi_and_softcap_change_the_scores() {
    let s = AttentionSpec::new(1, 1, 1, 3, 1).scale(1.0).window(1, 0);
    // Row 0 of sq=1, sk=3 sits at diagonal 2: window (1, 0) sees keys 1 and 2.
    let (o, _) = run(&s, &[0.0], &[0.0; 3], &[100.0, 2.0, 4.0]);
    assert!((o[0] - 3.0).abs() < 1e-9);
    // ALiBi slope ln 2: key 1 is at distance 1 -> weight halves.
    let s = AttentionSpec::new(1, 1, 1, 2, 1)
        .scale(1.0)
        .alibi(vec![2f32.ln()], false);
    let (o, _) = run(&s, &[0.0], &[0.0; 2], &[3.0, 0.0]);
    assert!((o[0] - 1.0).abs() < 1e-6, "{o:?}");
    // Softcap 1 bounds a huge score to tanh(100) ~ 1.
    let s = AttentionSpec::new(1, 1, 1, 1, 1).scale(1.0).softcap(1.0);
    let (_, lse) = run(&s, &[10.0], &[10.0], &[1.0]);
    assert!((lse[0] - 1.0).abs() < 1e-9);
}

#[test]
fn gqa_reads_the_shared_kv_head() {
    // Two query heads share one kv head: both outputs equal the single value row.
    let s = AttentionSpec::new(1, 2, 1, 1, 1).heads_kv(1);
    let (o, _) = run(&s, &[1.0, -1.0], &[0.5], &[7.0]);
    assert_eq!(o, vec![7.0, 7.0]);
}
