//! One head's attention weights `p_ij = exp(s_ij - lse_i)`, rebuilt from q, k and the
//! kernel's LSE, binned to at most `max_side` x `max_side` cells for a canvas.
//!
//! The kernel never stores P (that is the point of FlashAttention), but its LSE is enough
//! to recover any row of P. Each visible row must then sum to 1: a cheap check of the
//! kernel's LSE at sizes where the full reference would be too slow for a page.

use flashattn_core::{AttentionSpec, Error, Result, ScoreMod, TensorRef};

/// Binned attention weights of one (batch 0, head) pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Heatmap {
    pub head: usize,
    /// Cells per side: `rows` sampled query rows, `cols` bins of keys.
    pub rows: usize,
    pub cols: usize,
    /// Row-major `rows x cols`: the mean weight of the visible keys in each cell
    /// (attention mass / keys per bin), NaN where the mask hides every key of the cell.
    pub values: Vec<f32>,
    /// Cells whose keys are all masked.
    pub masked_cells: usize,
    /// Largest `|sum_j p_ij - 1|` over the sampled rows that see at least one key.
    pub row_sum_max_err: f64,
    /// The sampled query row of each heatmap row.
    pub query_rows: Vec<usize>,
}

/// The score of row `i` against key `j` through core's `ScoreMod` (what every backend applies):
/// `softcap(scale * q_i . k_j) - slope * |i + sk - sq - j|`.
fn score(
    spec: &AttentionSpec,
    smod: &ScoreMod,
    (q, k): (&TensorRef<'_>, &TensorRef<'_>),
    h: usize,
    i: usize,
    j: usize,
) -> f64 {
    let d = spec.head_dim;
    let qrow = (i * spec.heads_q + h) * d;
    let krow = (j * spec.heads_kv + spec.kv_head(h)) * d;
    let dot: f64 = (0..d)
        .map(|x| q.get_f32(qrow + x) as f64 * k.get_f32(krow + x) as f64)
        .sum();
    smod.apply(dot as f32, i, j, spec.seqlen_q, spec.seqlen_k) as f64
}

/// What `attention_heatmap` takes: a valid dense spec, a head of it, and q, k, LSE of its sizes.
fn check_inputs(
    spec: &AttentionSpec,
    (q, k): (&TensorRef<'_>, &TensorRef<'_>),
    lse: &[f32],
    head: usize,
    max_side: usize,
) -> Result<()> {
    let sizes = spec.validate()?.sizes;
    if spec.is_varlen() {
        return Err(Error::invalid(
            "varlen",
            "set",
            "the heatmap draws dense problems only",
        ));
    }
    if head >= spec.heads_q {
        return Err(Error::invalid(
            "heatmap_head",
            head,
            format!("must be below heads_q = {}", spec.heads_q),
        ));
    }
    if max_side == 0 {
        return Err(Error::invalid("max_side", 0, "must be at least 1"));
    }
    for (name, t, expected) in [("q", q, sizes.q), ("k", k, sizes.k)] {
        if t.len() != expected {
            return Err(Error::BufferLength {
                tensor: name,
                expected,
                actual: t.len(),
                shape: spec.shape_string(),
            });
        }
    }
    if lse.len() != sizes.lse {
        return Err(Error::BufferLength {
            tensor: "lse",
            expected: sizes.lse,
            actual: lse.len(),
            shape: format!(
                "batch {} x heads {} x seqlen_q {}",
                spec.batch, spec.heads_q, spec.seqlen_q
            ),
        });
    }
    Ok(())
}

/// Builds the heatmap of query head `head` of batch 0 of a dense spec from the inputs and
/// the kernel's LSE (`[batch, heads, seqlen_q]`).
pub fn attention_heatmap(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    lse: &[f32],
    head: usize,
    max_side: usize,
) -> Result<Heatmap> {
    check_inputs(spec, (&q, &k), lse, head, max_side)?;
    let (sq, sk) = (spec.seqlen_q, spec.seqlen_k);
    let rows = sq.min(max_side);
    let cols = sk.min(max_side);
    // Sample rows evenly (first and last included); bin keys into equal-width bins.
    let query_rows: Vec<usize> = (0..rows)
        .map(|r| {
            if rows == 1 {
                0
            } else {
                r * (sq - 1) / (rows - 1)
            }
        })
        .collect();
    let bin_of = |j: usize| j * cols / sk;
    let mut bin_width = vec![0usize; cols];
    for j in 0..sk {
        bin_width[bin_of(j)] += 1;
    }
    let mut values = vec![f32::NAN; rows * cols];
    let mut mass = vec![0f64; cols];
    let mut seen = vec![false; cols];
    let mut row_sum_max_err = 0f64;
    let smod = ScoreMod::of(spec, 0, head);
    for (r, &i) in query_rows.iter().enumerate() {
        let keys = spec.mask().keys(i, sq, sk);
        let (lo, hi) = (keys.start, keys.end);
        if lo >= hi {
            continue; // fully masked row: nothing visible, the cells stay NaN
        }
        let l = lse[spec.lse_index(0, head, i)] as f64;
        mass.fill(0.0);
        seen.fill(false);
        let mut row_sum = 0f64;
        for j in lo..hi {
            let p = (score(spec, &smod, (&q, &k), head, i, j) - l).exp();
            row_sum += p;
            mass[bin_of(j)] += p;
            seen[bin_of(j)] = true;
        }
        // NaN (an LSE of NaN or +-inf on a visible row) must show up as an error, not 0.
        let err = (row_sum - 1.0).abs();
        row_sum_max_err = if err.is_nan() {
            f64::INFINITY
        } else {
            row_sum_max_err.max(err)
        };
        for c in 0..cols {
            if seen[c] {
                values[r * cols + c] = (mass[c] / bin_width[c] as f64) as f32;
            }
        }
    }
    let masked_cells = values.iter().filter(|v| v.is_nan()).count();
    Ok(Heatmap {
        head,
        rows,
        cols,
        values,
        masked_cells,
        row_sum_max_err,
        query_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn_core::{random_inputs, reference_attention, DType};

    fn heatmap_of(spec: &AttentionSpec, head: usize, side: usize) -> Heatmap {
        let (q, k, v) = random_inputs(spec, 7);
        let r = reference_attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
        let lse: Vec<f32> = r.lse.iter().map(|&x| x as f32).collect();
        attention_heatmap(spec, q.as_ref(), k.as_ref(), &lse, head, side).unwrap()
    }

    #[test]
    fn rows_sum_to_one_with_the_reference_lse() {
        let base = AttentionSpec::new(1, 3, 33, 47, 40).return_lse(true);
        for spec in [
            base.clone(),
            base.clone().causal(true),
            base.clone().window(5, 3),
            base.clone()
                .softcap(2.0)
                .alibi(vec![0.5, 0.25, 0.125], false),
            base.clone().dtype(DType::F16).heads_kv(1),
        ] {
            let m = heatmap_of(&spec, 2, 256);
            assert!(m.row_sum_max_err < 1e-5, "{spec}: {}", m.row_sum_max_err);
            assert_eq!((m.rows, m.cols), (33, 47));
        }
    }

    #[test]
    fn a_wrong_lse_is_caught() {
        let spec = AttentionSpec::new(1, 1, 16, 16, 32).return_lse(true);
        let (q, k, _) = random_inputs(&spec, 1);
        let lse = vec![0.5f32; 16];
        let m = attention_heatmap(&spec, q.as_ref(), k.as_ref(), &lse, 0, 64).unwrap();
        assert!(m.row_sum_max_err > 0.1, "{}", m.row_sum_max_err);
        let nan = vec![f32::NAN; 16];
        let m = attention_heatmap(&spec, q.as_ref(), k.as_ref(), &nan, 0, 64).unwrap();
        assert!(m.row_sum_max_err.is_infinite());
    }

    #[test]
    fn masked_cells_follow_causal_and_window() {
        let n = 40;
        let causal = heatmap_of(
            &AttentionSpec::new(1, 1, n, n, 16)
                .return_lse(true)
                .causal(true),
            0,
            64,
        );
        assert_eq!(causal.masked_cells, n * (n - 1) / 2);
        assert!(causal.values[1].is_nan() && !causal.values[n].is_nan()); // (0,1) hidden, (1,0) seen
        let window = heatmap_of(
            &AttentionSpec::new(1, 1, n, n, 16)
                .return_lse(true)
                .window(3, 2),
            0,
            64,
        );
        let visible: usize = (0..n)
            .map(|i| (i + 2).min(n - 1) + 1 - i.saturating_sub(3))
            .sum();
        assert_eq!(window.masked_cells, n * n - visible);
    }

    #[test]
    fn causal_sq_greater_than_sk_leaves_masked_rows_empty() {
        let spec = AttentionSpec::new(1, 1, 20, 8, 16)
            .return_lse(true)
            .causal(true);
        let m = heatmap_of(&spec, 0, 64);
        // rows 0..12 see no key (j <= i - 12)
        assert!(m.values[..12 * 8].iter().all(|v| v.is_nan()));
        assert!(m.row_sum_max_err < 1e-6);
    }

    #[test]
    fn binning_keeps_mass_and_samples_ends() {
        let spec = AttentionSpec::new(1, 2, 300, 301, 16)
            .return_lse(true)
            .causal(true);
        let m = heatmap_of(&spec, 1, 64);
        assert_eq!((m.rows, m.cols), (64, 64));
        assert_eq!((m.query_rows[0], m.query_rows[63]), (0, 299));
        assert!(m.row_sum_max_err < 1e-5);
        // The last sampled row sees all keys: its bins' mass (mean * width) sums to 1.
        let widths: Vec<usize> = (0..64)
            .map(|c| (0..301).filter(|j| j * 64 / 301 == c).count())
            .collect();
        let total: f64 = (0..64)
            .map(|c| m.values[63 * 64 + c] as f64 * widths[c] as f64)
            .sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
    }

    #[test]
    fn alibi_decays_away_from_the_diagonal() {
        let spec = AttentionSpec::new(1, 1, 64, 64, 16)
            .return_lse(true)
            .alibi(vec![0.5], false);
        let m = heatmap_of(&spec, 0, 64);
        let row = &m.values[32 * 64..33 * 64];
        assert!(row[32] > 10.0 * row[20] && row[32] > 10.0 * row[44]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let spec = AttentionSpec::new(1, 2, 4, 4, 8).return_lse(true);
        let (q, k, _) = random_inputs(&spec, 1);
        let lse = vec![0.0f32; 8];
        assert!(attention_heatmap(&spec, q.as_ref(), k.as_ref(), &lse, 2, 8).is_err());
        assert!(attention_heatmap(&spec, q.as_ref(), k.as_ref(), &lse, 0, 0).is_err());
        assert!(attention_heatmap(&spec, q.as_ref(), k.as_ref(), &lse[..3], 0, 8).is_err());
        let short = flashattn_core::Tensor::F32(vec![0.5; 5]);
        assert!(attention_heatmap(&spec, q.as_ref(), short.as_ref(), &lse, 0, 8).is_err());
    }
}
