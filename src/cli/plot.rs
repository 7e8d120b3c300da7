//! `bench --plot`: throughput against length, one line per (backend, head_dim, causal):
//! TFLOP/s against sequence length (forward, backward), GB/s against cache length (decode).

use super::bench_record::Record;
use super::CliResult;
use flashattn::Pass;
use plotters::prelude::*;
use std::collections::BTreeMap;

/// The chart of `records` as SVG text.
pub fn svg(records: &[Record], pass: Pass) -> CliResult<String> {
    let (title, x_desc, y_desc) = match pass {
        Pass::Decode => (
            "flashattn decode: GB/s of K/V read vs cache length".to_string(),
            "cache length (rows per sequence)",
            "GB/s",
        ),
        _ => (
            format!("flashattn {}: TFLOP/s vs sequence length", pass.name()),
            "sequence length",
            "TFLOP/s",
        ),
    };
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        let (x, y) = match pass {
            Pass::Decode => (r.shape.cache_len.unwrap_or(0), r.gbps),
            _ => (r.shape.seqlen_q, r.tflops),
        };
        if let Some(y) = y {
            let causal = if r.shape.causal { " causal" } else { "" };
            let name = format!("{} d={}{causal}", r.backend, r.shape.head_dim);
            series.entry(name).or_default().push((x.max(1) as f64, y));
        }
    }
    if series.is_empty() {
        return Err("nothing to plot: no benchmark produced a timing".into());
    }
    let mut text = String::new();
    draw(&mut text, &title, x_desc, y_desc, series)
        .map_err(|e| format!("cannot draw the plot: {e}"))?;
    Ok(text)
}

type Series = BTreeMap<String, Vec<(f64, f64)>>;

fn draw(
    text: &mut String,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: Series,
) -> Result<(), String> {
    let points = series.values().flatten();
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max) * 1.2;
    let x_min = points.clone().map(|p| p.0).fold(f64::INFINITY, f64::min) / 1.2;
    let y_max = points.map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::with_string(text, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_max.max(1e-6))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (name, mut pts)) in series.into_iter().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
