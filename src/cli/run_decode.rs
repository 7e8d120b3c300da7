//! `flashattn run --decode`: one decode step against a random KV cache (append the new rows,
//! then attend), checked against the f64 reference's output, LSE and caches after the append.

use super::decode_spec::DEFAULT_CACHE_LEN;
use super::run::{finish, finite_or_null, write_out_and_lse, Check, Report, RunArgs};
use super::{budget, CliResult};
use flashattn::testing::decode::DecodeData;
use flashattn::{lse_max_error, rel_l2_error, AttentionSpec, DType, Pass, Tensor};
use std::time::Instant;

pub fn run(args: &RunArgs) -> CliResult<i32> {
    let mut outputs = args.outputs()?;
    let cache_len = args.cache.cache_len.unwrap_or(DEFAULT_CACHE_LEN);
    let mut spec = args.cache.spec(&args.shape, cache_len)?;
    if let Some(path) = &args.alibi {
        spec = super::run_inputs::with_alibi(spec, path)?;
    }
    spec.return_lse = args.lse.is_some() || args.check;
    spec.validate().map_err(|e| e.to_string())?;
    let spec = &spec;
    budget::check(
        "the inputs and results of this decode step",
        budget::run_bytes(spec, Pass::Decode, args.check),
    )?;
    let data = DecodeData::random(spec, args.seed);
    let selection = args.select(spec, Pass::Decode)?;
    let (mut k_after, mut v_after) = (data.k_cache.clone(), data.v_cache.clone());
    let start = Instant::now();
    let output = selection
        .backend
        .decode(spec, data.inputs((&mut k_after, &mut v_after)))
        .map_err(|e| e.to_string())?;
    let time_ms = start.elapsed().as_secs_f64() * 1e3;
    let out = output.out.to_f32_vec();

    let check =
        if args.check {
            if !args.json {
                eprintln!("checking against the f64 reference decode ...");
            }
            let want = data.reference(spec).map_err(|e| e.to_string())?;
            let rel_l2 = rel_l2_error(&out, &want.out);
            let lse_err = output
                .lse
                .as_ref()
                .map_or(f64::INFINITY, |l| lse_max_error(l, &want.lse));
            let (k_err, k_kept) = cache_error(spec, &data.k_cache, &k_after, &want.k_cache);
            let (v_err, v_kept) = cache_error(spec, &data.v_cache, &v_after, &want.v_cache);
            let tolerance = spec.dtype.tolerance();
            let new_err = k_err.max(v_err);
            Some(Check {
                fields: serde_json::json!({
                    "rel_l2": finite_or_null(rel_l2),
                    "lse_max_abs": finite_or_null(lse_err),
                    "appended_rows_rel_l2": finite_or_null(new_err),
                    "other_rows_unchanged": k_kept && v_kept,
                    "tolerance": tolerance,
                }),
                line: format!(
                "relative L2 error {rel_l2:.3e} (tolerance {tolerance:.0e}), LSE max abs error \
                 {lse_err:.3e}, appended cache rows {new_err:.3e}, other cache rows {}",
                if k_kept && v_kept { "unchanged" } else { "CHANGED" }
            ),
                passed: rel_l2 <= tolerance
                    && lse_err <= spec.dtype.lse_tolerance()
                    && new_err <= tolerance
                    && k_kept
                    && v_kept,
            })
        } else {
            None
        };

    let file_dtype = match spec.dtype {
        DType::F16 => DType::F16,
        _ => DType::F32,
    };
    write_out_and_lse(&mut outputs, spec, &out, output.lse.as_deref(), file_dtype)?;
    let kv_bytes = kv_bytes_read(spec);
    Ok(finish(
        args,
        Report {
            selection: &selection,
            spec,
            pass: Pass::Decode,
            fields: serde_json::json!({"time_ms": time_ms, "kv_bytes_read": kv_bytes}),
            summary: format!(
                "{spec}: {time_ms:.3} ms host wall time ({} of K/V attended, includes transfers)",
                budget::human(kv_bytes as u128)
            ),
            check,
        },
    ))
}

/// Bytes of K and V a decode step attends: `seqlens[b] + seqlen_new` rows per sequence, each
/// `heads_kv x (head_dim + head_dim_v)` elements. Requires a validated decode spec.
pub fn kv_bytes_read(spec: &AttentionSpec) -> u64 {
    let row = (spec.heads_kv * (spec.head_dim + spec.head_dim_v) * spec.dtype.size_bytes()) as u64;
    (0..spec.batch)
        .map(|b| spec.seq(b).k_len as u64 * row)
        .sum()
}

/// The relative L2 error of the rows this step appended (against the reference's cache after
/// the append), and whether every other row is bitwise what it was before.
fn cache_error(spec: &AttentionSpec, before: &Tensor, after: &Tensor, want: &[f64]) -> (f64, bool) {
    let Some(cache) = &spec.kv_cache else {
        return (f64::INFINITY, false);
    };
    let rows = spec.k_tokens().unwrap_or(0).max(1);
    let width = before.len() / rows;
    let mut appended = vec![false; rows];
    for b in 0..spec.batch {
        let used = cache.seqlens[b] as usize;
        for pos in used..used + cache.seqlen_new {
            appended[cache.row(b, pos)] = true;
        }
    }
    let (before, after) = (before.to_f32_vec(), after.to_f32_vec());
    let (mut got, mut expected) = (Vec::new(), Vec::new());
    let mut kept = true;
    for (r, &is_new) in appended.iter().enumerate() {
        let span = r * width..(r + 1) * width;
        if is_new {
            got.extend_from_slice(&after[span.clone()]);
            expected.extend_from_slice(&want[span]);
        } else {
            kept &= after[span.clone()]
                .iter()
                .zip(&before[span])
                .all(|(a, b)| a.to_bits() == b.to_bits());
        }
    }
    let err = if got.is_empty() {
        0.0
    } else {
        rel_l2_error(&got, &expected)
    };
    (err, kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashattn::KvCache;

    #[test]
    fn cache_errors_see_the_appended_rows_and_any_other_change() {
        // 2 sequences of 4 rows, 1 head of dim 2; sequence b appends at row seqlens[b].
        let spec = AttentionSpec::new(2, 1, 1, 1, 2)
            .kv_cache(KvCache::contiguous(2, 4, vec![1, 2]).seqlen_new(1));
        let before = Tensor::F32((0..16).map(|x| x as f32).collect());
        let mut want: Vec<f64> = (0..16).map(|x| x as f64).collect();
        // Rows 1 (sequence 0) and 6 (sequence 1) are appended.
        for i in [2, 3, 12, 13] {
            want[i] = 100.0 + i as f64;
        }
        let after = Tensor::F32(want.iter().map(|&x| x as f32).collect());
        assert_eq!(cache_error(&spec, &before, &after, &want), (0.0, true));
        let mut wrong_row = want.clone();
        wrong_row[12] = -1.0;
        let after = Tensor::F32(wrong_row.iter().map(|&x| x as f32).collect());
        assert!(cache_error(&spec, &before, &after, &want).0 > 0.1);
        let mut touched = want.clone();
        touched[0] = 0.5;
        let after = Tensor::F32(touched.iter().map(|&x| x as f32).collect());
        assert!(!cache_error(&spec, &before, &after, &want).1);
        assert_eq!(kv_bytes_read(&spec), (2 + 3) * 2 * 2 * 4);
    }
}
