//! `--plot FILE.svg`: for each latency measure, the CDF of both systems side by side (every
//! round's samples together), drawn with plotters' SVG backend on a logarithmic time axis.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::compare::{Comparison, Measured, Row, Unit};
use crate::measure::Latency;

/// Width of one chart, and its height.
const PANEL: (u32, u32) = (620, 360);

/// Draws one panel per latency row that has samples, two panels per line.
pub fn draw(comparison: &Comparison, path: &Path) -> anyhow::Result<()> {
    let rows: Vec<&Row> = comparison.rows.iter().filter(|row| row.unit == Unit::Micros).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let lines = rows.len().div_ceil(2);
    let size = (PANEL.0 * 2, PANEL.1 * u32::try_from(lines).unwrap_or(1));
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
    let panels = root.split_evenly((lines, 2));
    for (row, panel) in rows.iter().zip(panels.iter()) {
        draw_row(row, panel).map_err(|e| anyhow!("cannot draw the CDF of {}: {e}", row.name))?;
    }
    root.present().map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// Every round's samples of one system, merged.
fn merged(rounds: &[Measured]) -> Option<Latency> {
    let mut all: Option<Latency> = None;
    for latency in rounds.iter().filter_map(Measured::latency) {
        match &mut all {
            None => all = Some(latency.clone()),
            Some(total) => total.merge(latency).ok()?,
        }
    }
    all
}

fn draw_row(row: &Row, area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()> {
    let ours = merged(&row.ours).map(|latency| latency.cdf_points()).unwrap_or_default();
    let etcd = merged(&row.etcd).map(|latency| latency.cdf_points()).unwrap_or_default();
    let all = ours.iter().chain(&etcd).map(|(micros, _)| *micros);
    let low = all.clone().fold(f64::INFINITY, f64::min).max(0.001);
    let high = all.fold(0.0, f64::max).max(low * 10.0);
    let caption = format!("{} ({} nodes)", row.name, row.nodes);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(44)
        .build_cartesian_2d((low * 0.8..high * 1.2).log_scale(), 0.0..1.0)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|micros| format_axis_micros(*micros))
        .x_desc("latency, µs (log)")
        .y_desc("fraction ≤")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (points, color, label) in
        [(ours, BLUE, format!("konorkestra: {}", row.ours_how)), (etcd, RED, format!("etcd: {}", row.etcd_how))]
    {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Axis labels: `0.02`, `35`, `1,200`: no decimals past 10 µs.
fn format_axis_micros(micros: f64) -> String {
    if micros < 10.0 {
        format!("{micros:.2}")
    } else {
        crate::measure::format_micros(micros).trim_end_matches(" µs").to_owned()
    }
}
