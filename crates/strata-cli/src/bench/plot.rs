//! `--plot FILE`: an SVG of small multiples, one panel per metric, one colored bar per
//! strategy in each, every bar labelled with its value; the scenario and parameters are
//! in the title.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{BenchReport, StrategyReport};

/// One panel: a metric of every strategy, on a log axis.
struct Panel {
    title: &'static str,
    unit: &'static str,
    values: Vec<f64>,
    labels: Vec<String>,
    /// A horizontal reference line (value, label).
    reference: Option<(f64, String)>,
}

const PANEL_WIDTH: u32 = 330;
const HEIGHT: u32 = 520;
const TITLE_HEIGHT: u32 = 86;

/// The color of a strategy, the same in every panel.
fn color(name: &str) -> RGBColor {
    match name {
        "none" => RGBColor(127, 127, 127),
        "local-ttl" => RGBColor(230, 145, 30),
        "redis-global" => RGBColor(214, 39, 40),
        "near-pubsub" => RGBColor(120, 80, 190),
        "strata" => RGBColor(30, 140, 70),
        _ => RGBColor(31, 119, 180),
    }
}

fn compact(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn panels(report: &BenchReport) -> Vec<Panel> {
    let s = &report.strategies;
    let values = |f: fn(&StrategyReport) -> f64| s.iter().map(f).collect::<Vec<_>>();
    let compact_labels = |v: &[f64]| v.iter().map(|x| compact(*x)).collect::<Vec<_>>();

    let db = values(|r| r.db_reads_per_s);
    let redis = values(|r| r.redis_ops_per_s);
    let p99 = values(|r| r.p99_us);
    let stale = values(|r| r.stale_reads as f64);
    let mut out = vec![
        Panel {
            title: "DB reads/s",
            unit: "reads/s (log)",
            labels: compact_labels(&db),
            values: db,
            reference: Some((report.compulsory_db_reads_per_s, "compulsory bound".to_owned())),
        },
        Panel {
            title: "Redis (shared tier) ops/s",
            unit: "ops/s (log)",
            labels: compact_labels(&redis),
            values: redis,
            reference: None,
        },
        Panel {
            title: "read latency p99",
            unit: "microseconds (log)",
            labels: p99.iter().map(|v| format!("{} us", compact(*v))).collect(),
            values: p99,
            reference: None,
        },
        Panel {
            title: "stale reads (all readers)",
            unit: "reads (log; 0 = no bar)",
            labels: s
                .iter()
                .map(|r| {
                    if r.stale_reads == 0 {
                        "0".to_owned()
                    } else {
                        format!("{} (max {})", compact(r.stale_reads as f64), stale_age(r.max_stale_ms))
                    }
                })
                .collect(),
            values: stale,
            reference: None,
        },
    ];
    if report.scenario == "payment" {
        let consumer = values(|r| r.consumer_stale_reads as f64);
        out.push(Panel {
            title: "consumer stale reads",
            unit: "reads after the event (log)",
            labels: s.iter().map(|r| format!("{}/{}", r.consumer_stale_reads, r.consumer_reads)).collect(),
            values: consumer,
            reference: None,
        });
    }
    out
}

fn stale_age(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.0} us", ms * 1000.0)
    }
}

/// Writes the chart of `report` to `path` as SVG.
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<()> {
    let panels = panels(report);
    let width = PANEL_WIDTH * panels.len() as u32;
    let root = SVGBackend::new(path, (width, HEIGHT)).into_drawing_area();
    draw(report, &panels, &root).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
    root.present().map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn draw(report: &BenchReport, panels: &[Panel], root: &DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult {
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(TITLE_HEIGHT);
    let title = format!("strata bench — scenario {}", report.scenario);
    top.draw(&Text::new(title, (14, 10), ("sans-serif", 22).into_font().style(FontStyle::Bold)))?;
    let params = format!(
        "{}; {} requests, compulsory DB reads {:.1}/s; {}",
        report.parameters(),
        report.requests,
        report.compulsory_db_reads_per_s,
        report.redis.as_deref().map_or("embedded (in-process tier and backplane)", |_| "Redis")
    );
    top.draw(&Text::new(params, (14, 38), ("sans-serif", 13)))?;
    // Legend: one swatch per strategy.
    let mut x = 14;
    for s in &report.strategies {
        let c = color(&s.name);
        top.draw(&Rectangle::new([(x, 62), (x + 14, 76)], c.filled()))?;
        top.draw(&Text::new(s.name.clone(), (x + 19, 62), ("sans-serif", 13)))?;
        x += 30 + 8 * s.name.len() as i32;
    }

    let areas = body.split_evenly((1, panels.len()));
    let names: Vec<&str> = report.strategies.iter().map(|s| s.name.as_str()).collect();
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel, &names)?;
    }
    Ok(())
}

fn draw_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Panel, names: &[&str]) -> DrawResult {
    let n = panel.values.len().max(1);
    let positive =
        panel.values.iter().copied().chain(panel.reference.iter().map(|r| r.0)).filter(|v| *v > 0.0);
    let min = positive.clone().fold(f64::INFINITY, f64::min);
    let max = positive.fold(0.0f64, f64::max);
    let (lo, hi) = if max > 0.0 {
        (10f64.powf((min.log10() - 0.3).floor()).min(0.5), 10f64.powf((max.log10() + 0.6).ceil()))
    } else {
        (0.5, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 16).into_font().style(FontStyle::Bold))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(52)
        .build_cartesian_2d((0..n).into_segmented(), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(panel.unit)
        .y_label_formatter(&|v| compact(*v))
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).map_or(String::new(), |s| short(s)),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 11))
        .draw()?;
    chart.draw_series(panel.values.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| {
        let c = color(names.get(i).copied().unwrap_or(""));
        let mut bar =
            Rectangle::new([(SegmentValue::Exact(i), lo), (SegmentValue::Exact(i + 1), *v)], c.filled());
        bar.set_margin(0, 0, 7, 7);
        bar
    }))?;
    let label_style = ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(panel.values.iter().zip(&panel.labels).enumerate().map(|(i, (v, label))| {
        let y = if *v > 0.0 { v * 1.12 } else { lo * 1.12 };
        Text::new(label.clone(), (SegmentValue::CenterOf(i), y), label_style.clone())
    }))?;
    if let Some((value, label)) = &panel.reference
        && *value > 0.0
    {
        let line = DashedLineSeries::new(
            [(SegmentValue::Exact(0), *value), (SegmentValue::Exact(n), *value)],
            6,
            4,
            BLACK.stroke_width(1),
        );
        chart.draw_series(line)?;
        let style = ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Top));
        chart.draw_series(std::iter::once(Text::new(
            format!("{label} {}", compact(*value)),
            (SegmentValue::Exact(0), value / 1.15),
            style,
        )))?;
    }
    Ok(())
}

/// Short x-axis names so that five fit under a panel.
fn short(name: &str) -> String {
    match name {
        "redis-global" => "redis-gl.".to_owned(),
        "near-pubsub" => "near-pub".to_owned(),
        other => other.to_owned(),
    }
}
