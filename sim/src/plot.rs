//! `--plot out.svg`: the fraction of members holding each change over time since its write
//! (one line per change), and the distribution of failure detection times (a CDF), drawn with
//! plotters' SVG backend.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::report::RunReport;
use crate::workload::GroupKind;

/// Changes drawn at most, so a long run stays a readable picture.
const CURVES_MAX: usize = 200;

/// Draws the report's charts to `path`.
pub fn draw(report: &RunReport, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))?;
    let (top, bottom) = root.split_vertically(440);
    draw_spread(report, &top).context("drawing the spread of changes")?;
    draw_detection(report, &bottom).context("drawing detection times")?;
    root.present().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// A chart of a fraction (0 to 1) against seconds, with its axes drawn.
fn fraction_chart<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: String,
    horizon_s: f64,
    x_desc: &str,
    y_desc: &str,
) -> anyhow::Result<
    ChartContext<
        'a,
        SVGBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..horizon_s, 0.0..1.02)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(chart)
}

fn draw_spread(report: &RunReport, area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()> {
    let changes: Vec<_> = report.spreads.iter().take(CURVES_MAX).collect();
    // The slowest changes (a node down or cut off) would squeeze every other curve against the
    // axis: the chart spans the 99th percentile of all delays, and longer ones run off its edge.
    let mut all_s: Vec<f64> = changes.iter().flat_map(|s| s.delays_us.iter().map(|&us| us as f64 / 1e6)).collect();
    all_s.sort_by(f64::total_cmp);
    let horizon_s = crate::report::percentile(&all_s, 99.0).unwrap_or(1.0).clamp(0.1, 120.0) * 1.2;
    let caption = format!(
        "Members holding each change ({} nodes, seed {}, {} changes; blue ev, red st)",
        report.config.nodes,
        report.config.seed,
        changes.len()
    );
    let mut chart = fraction_chart(area, caption, horizon_s, "seconds since the write", "fraction of members")?;
    for spread in &changes {
        let color = match spread.group {
            GroupKind::Eventual => BLUE.mix(0.25),
            GroupKind::Strong => RED.mix(0.35),
            GroupKind::Gated => GREEN.mix(0.35),
        };
        let members = spread.members.max(1) as f64;
        let mut points = vec![(0.0, 0.0)];
        for (i, &us) in spread.delays_us.iter().enumerate() {
            let x = (us as f64 / 1e6).min(horizon_s);
            points.push((x, i as f64 / members));
            points.push((x, (i + 1) as f64 / members));
        }
        if let Some(&(x, y)) = points.last() {
            points.push((horizon_s.max(x), y));
        }
        chart.draw_series(LineSeries::new(points, color.stroke_width(1))).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

fn draw_detection(
    report: &RunReport,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> anyhow::Result<()> {
    let times: Vec<f64> = report.detections_us.iter().map(|&us| us as f64 / 1e6).collect();
    let horizon_s = times.last().copied().unwrap_or(1.0).max(1.0) * 1.1;
    let caption = format!("Failure detection: crash until marked dead ({} observations)", times.len());
    let mut chart = fraction_chart(area, caption, horizon_s, "seconds since the crash", "fraction of observations")?;
    if times.is_empty() {
        return Ok(());
    }
    let total = times.len() as f64;
    let mut points = vec![(0.0, 0.0)];
    for (i, &t) in times.iter().enumerate() {
        points.push((t, i as f64 / total));
        points.push((t, (i + 1) as f64 / total));
    }
    chart.draw_series(LineSeries::new(points, BLACK.stroke_width(2))).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
