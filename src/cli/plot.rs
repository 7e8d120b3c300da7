//! `--plot`: TFLOP/s against sequence length, one line per (backend, head_dim, causal).

use super::bench::Record;
use super::CliResult;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

pub fn tflops_vs_seqlen(path: &Path, records: &[Record]) -> CliResult<()> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        if let Some(t) = r.tflops {
            let name = format!(
                "{} d={}{}",
                r.backend,
                r.shape.head_dim,
                if r.shape.causal { " causal" } else { "" }
            );
            series
                .entry(name)
                .or_default()
                .push((r.shape.seqlen_q as f64, t));
        }
    }
    if series.is_empty() {
        return Err("nothing to plot: no benchmark produced a timing".into());
    }
    let points = series.values().flatten();
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max) * 1.2;
    let x_min = points.clone().map(|p| p.0).fold(f64::INFINITY, f64::min) / 1.2;
    let y_max = points.map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let fail = |e: String| format!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "flashattn forward: TFLOP/s vs sequence length",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_max.max(1e-6))
        .map_err(|e| fail(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("sequence length")
        .y_desc("TFLOP/s")
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    for (i, (name, mut pts)) in series.into_iter().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| fail(e.to_string()))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| fail(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}
