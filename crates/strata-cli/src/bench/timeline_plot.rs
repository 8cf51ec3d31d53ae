//! `--timeline FILE`: the measured window second by second, one line per strategy in
//! four panels over a shared time axis (DB reads/s, the hottest key's DB loads, shared-
//! tier ops/s, read p99), the injected events as labelled vertical lines across all of
//! them and the hottest key's expiries as dots (at the reload, height = its loads).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::plot::{color, compact};
use super::report::{BenchReport, StrategyReport};
use super::timeline::Timeline;

const WIDTH: u32 = 1200;
const HEADER_HEIGHT: u32 = 96;
const PANEL_HEIGHT: u32 = 240;

/// What a panel shows of a timeline.
struct Panel {
    title: &'static str,
    unit: &'static str,
    series: fn(&Timeline) -> Vec<f64>,
    /// Draw the hottest key's expiries on it.
    expiries: bool,
}

const PANELS: [Panel; 4] = [
    Panel { title: "DB reads/s", unit: "reads/s, log", series: db_reads, expiries: false },
    Panel {
        title: "hottest key: DB loads/s (dots: an expiry's reload, height = its loads)",
        unit: "loads, log",
        series: hot_key,
        expiries: true,
    },
    Panel {
        title: "shared tier + backplane ops/s (client-side)",
        unit: "ops/s, log",
        series: ops,
        expiries: false,
    },
    Panel {
        title: "read latency p99 of the requests due in each second",
        unit: "ms, log",
        series: p99_ms,
        expiries: false,
    },
];

fn as_f64(v: &[u64]) -> Vec<f64> {
    v.iter().map(|n| *n as f64).collect()
}
fn db_reads(t: &Timeline) -> Vec<f64> {
    as_f64(&t.db_reads)
}
fn hot_key(t: &Timeline) -> Vec<f64> {
    as_f64(&t.hot_key_db_reads)
}
fn ops(t: &Timeline) -> Vec<f64> {
    as_f64(&t.shared_tier_ops)
}
fn p99_ms(t: &Timeline) -> Vec<f64> {
    t.read_p99_us.iter().map(|us| us / 1e3).collect()
}

/// Writes the timeline of `report` to `path` as SVG.
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<()> {
    let size = (WIDTH, HEADER_HEIGHT + PANEL_HEIGHT * PANELS.len() as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    draw(report, &root).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
    root.present().map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn draw(report: &BenchReport, root: &DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult {
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(HEADER_HEIGHT);
    let with: Vec<(&StrategyReport, &Timeline)> =
        report.strategies.iter().filter_map(|s| Some((s, s.timeline.as_ref()?))).collect();
    let window = with.first().map_or("cold", |(_, t)| t.window);
    let title = format!("strata bench: scenario {}, the {window} window second by second", report.scenario);
    top.draw(&Text::new(title, (14, 10), ("sans-serif", 22).into_font().style(FontStyle::Bold)))?;
    top.draw(&Text::new(report.parameters(), (14, 40), ("sans-serif", 13)))?;
    let mut x = 14;
    for (s, _) in &with {
        top.draw(&Rectangle::new([(x, 66), (x + 14, 80)], color(&s.name).filled()))?;
        top.draw(&Text::new(s.name.clone(), (x + 19, 66), ("sans-serif", 13)))?;
        x += 34 + 8 * s.name.len() as i32;
    }
    let seconds = with.iter().map(|(_, t)| t.db_reads.len()).max().unwrap_or(1).max(1) as f64;
    let events: Vec<(f64, &'static str)> = with
        .first()
        .map(|(_, t)| t.events.iter().map(|e| (e.at_s, e.kind.label())).collect())
        .unwrap_or_default();
    let areas = body.split_evenly((PANELS.len(), 1));
    for (i, (area, panel)) in areas.iter().zip(&PANELS).enumerate() {
        draw_panel(area, panel, &with, seconds, &events, i == 0)?;
    }
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel,
    with: &[(&StrategyReport, &Timeline)],
    seconds: f64,
    events: &[(f64, &'static str)],
    label_events: bool,
) -> DrawResult {
    let all: Vec<Vec<f64>> = with.iter().map(|(_, t)| (panel.series)(t)).collect();
    let positive = all.iter().flatten().copied().filter(|v| *v > 0.0);
    let max = positive.clone().fold(0.0f64, f64::max);
    let min = positive.fold(f64::INFINITY, f64::min);
    let (lo, hi) = if max > 0.0 {
        (10f64.powf(min.log10().floor()).min(0.5), 10f64.powf((max.log10() + 0.3).ceil()))
    } else {
        (0.5, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 14).into_font().style(FontStyle::Bold))
        .margin(8)
        .margin_right(20)
        .x_label_area_size(26)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..seconds, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds into the window")
        .y_desc(panel.unit)
        .y_label_formatter(&|v| compact(*v))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 11))
        .draw()?;
    for ((s, _), values) in with.iter().zip(&all) {
        let c = color(&s.name);
        // A zero is drawn at the bottom of the log axis (no value there).
        let points = values.iter().enumerate().map(|(i, v)| (i as f64 + 0.5, v.max(lo)));
        chart.draw_series(LineSeries::new(points, c.stroke_width(2)))?;
    }
    if panel.expiries {
        for (s, t) in with {
            let c = color(&s.name);
            let dots = t.expiries().map(|r| Circle::new((r.at_s, (r.loads as f64).max(lo)), 4, c.filled()));
            chart.draw_series(dots)?;
        }
    }
    for (at, label) in events {
        let grey = RGBColor(70, 70, 70);
        chart.draw_series(DashedLineSeries::new([(*at, lo), (*at, hi)], 5, 4, grey.stroke_width(1)))?;
        if label_events {
            let style = ("sans-serif", 12).into_font().color(&grey);
            chart.draw_series(std::iter::once(Text::new(format!(" {label}"), (*at, hi / 1.6), style)))?;
        }
    }
    Ok(())
}
