//! `--plot FILE`: an SVG of small multiples, one panel per metric and one colored bar
//! per strategy in each, every bar labelled with its value. The title carries the
//! scenario and the parameters; a legend maps colors to strategies.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{BenchReport, StrategyReport};

/// How a panel's values are drawn.
enum Scale {
    /// A log axis; zero values get no bar. An optional dashed reference line.
    Log { reference: Option<f64> },
    /// A 0–100 % axis with two stacked parts per bar (dark, then light).
    StackedPercent { upper: Vec<f64> },
}

/// One panel: a metric of every strategy.
struct Panel {
    title: String,
    unit: &'static str,
    values: Vec<f64>,
    labels: Vec<String>,
    scale: Scale,
}

const COLUMNS: usize = 4;
const PANEL_WIDTH: u32 = 340;
const PANEL_HEIGHT: u32 = 330;
const HEADER_HEIGHT: u32 = 112;

/// The color of a strategy, the same in every panel.
pub(crate) fn color(name: &str) -> RGBColor {
    match name {
        "none" => RGBColor(127, 127, 127),
        "local-ttl" => RGBColor(230, 145, 30),
        "redis-global" => RGBColor(214, 39, 40),
        "near-pubsub" => RGBColor(120, 80, 190),
        "strata" => RGBColor(30, 140, 70),
        "multi-tier" => RGBColor(23, 190, 207),
        _ => RGBColor(31, 119, 180),
    }
}

/// A lighter shade of `c`, for the second part of a stacked bar.
fn light(c: RGBColor) -> RGBColor {
    let mix = |v: u8| ((u16::from(v) + 2 * 255) / 3) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// A number in at most ~4 characters.
pub(crate) fn compact(v: f64) -> String {
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
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.0e}")
    }
}

/// A duration given in milliseconds, in the unit that suits it.
fn age(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.0} us", ms * 1000.0)
    }
}

fn panels(report: &BenchReport) -> Vec<Panel> {
    let s = &report.strategies;
    let values = |f: fn(&StrategyReport) -> f64| s.iter().map(f).collect::<Vec<_>>();
    let labels = |v: &[f64]| v.iter().map(|x| compact(*x)).collect::<Vec<_>>();
    let db = values(|r| r.db_reads_per_s);
    let ops = values(|r| r.redis_ops_per_s);
    let l1 = values(|r| r.l1_hit_rate * 100.0);
    let l2 = values(|r| r.l2_hit_rate * 100.0);
    let p99 = values(|r| r.p99_us);
    let hot = values(|r| r.hottest_key_loads_per_expiry.unwrap_or(0.0));
    let stale = values(|r| r.stale_reads as f64);
    let max_stale = values(|r| r.max_stale_ms);
    let mut out = vec![
        Panel {
            title: format!("DB reads/s (dashed: compulsory {})", compact(report.compulsory_db_reads_per_s)),
            unit: "reads/s, log",
            labels: labels(&db),
            values: db,
            scale: Scale::Log { reference: Some(report.compulsory_db_reads_per_s) },
        },
        Panel {
            title: if report.redis.is_some() {
                "Redis commands/s (counted client-side)".to_owned()
            } else {
                "shared tier + backplane ops/s".to_owned()
            },
            unit: "ops/s, log",
            labels: labels(&ops),
            values: ops,
            scale: Scale::Log { reference: None },
        },
        Panel {
            title: "hit rate (dark L1, light L2)".to_owned(),
            unit: "% of reads",
            labels: l1.iter().zip(&l2).map(|(a, b)| format!("{:.0}%", a + b)).collect(),
            values: l1,
            scale: Scale::StackedPercent { upper: l2 },
        },
        Panel {
            title: "read latency p99 (from the schedule)".to_owned(),
            unit: "microseconds, log",
            labels: labels(&p99),
            values: p99,
            scale: Scale::Log { reference: None },
        },
        Panel {
            title: "hottest key: DB loads per reload".to_owned(),
            unit: "loads, log (dashed: 1 = ideal)",
            labels: s
                .iter()
                .map(|r| r.hottest_key_loads_per_expiry.map_or_else(|| "n/a".to_owned(), compact))
                .collect(),
            values: hot,
            scale: Scale::Log { reference: Some(1.0) },
        },
        Panel {
            title: "stale reads (all readers)".to_owned(),
            unit: "reads, log (0: no bar)",
            labels: labels(&stale),
            values: stale,
            scale: Scale::Log { reference: None },
        },
        Panel {
            title: "max staleness of a stale read".to_owned(),
            unit: "milliseconds, log",
            labels: s
                .iter()
                .map(|r| if r.stale_reads == 0 { "-".to_owned() } else { age(r.max_stale_ms) })
                .collect(),
            values: max_stale,
            scale: Scale::Log { reference: None },
        },
    ];
    if s.iter().any(|r| r.propagation_lag.is_some()) {
        let lag = values(|r| r.propagation_lag.as_ref().map_or(0.0, |l| l.p99_us / 1e3));
        out.push(Panel {
            title: "propagation lag p99 (write returned -> all dropped)".to_owned(),
            unit: "milliseconds, log",
            labels: s
                .iter()
                .map(|r| r.propagation_lag.as_ref().map_or_else(|| "n/a".to_owned(), |l| age(l.p99_us / 1e3)))
                .collect(),
            values: lag,
            scale: Scale::Log { reference: None },
        });
    }
    if report.scenario == "payment" {
        out.push(Panel {
            title: "consumer stale reads (after the event)".to_owned(),
            unit: "reads, log (0: no bar)",
            labels: s.iter().map(|r| format!("{}/{}", r.consumer_stale_reads, r.consumer_reads)).collect(),
            values: values(|r| r.consumer_stale_reads as f64),
            scale: Scale::Log { reference: None },
        });
    }
    out
}

/// Writes the chart of `report` to `path` as SVG.
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<()> {
    let panels = panels(report);
    let rows = panels.len().div_ceil(COLUMNS);
    let size = (PANEL_WIDTH * COLUMNS as u32, HEADER_HEIGHT + PANEL_HEIGHT * rows as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    draw(report, &panels, rows, &root).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
    root.present().map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn draw(
    report: &BenchReport,
    panels: &[Panel],
    rows: usize,
    root: &DrawingArea<SVGBackend<'_>, Shift>,
) -> DrawResult {
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(HEADER_HEIGHT);
    let title = format!("strata bench: scenario {}", report.scenario);
    top.draw(&Text::new(title, (14, 10), ("sans-serif", 22).into_font().style(FontStyle::Bold)))?;
    let backend = match &report.redis {
        Some(_) => "Redis: strata on RedisTier + RedisStreamBackplane, near-pubsub on Pub/Sub".to_owned(),
        None => "embedded: in-process tier and backplane".to_owned(),
    };
    let line1 = format!("{}; SQL on {}; {}", report.parameters(), database_kind(&report.database), backend);
    top.draw(&Text::new(line1, (14, 40), ("sans-serif", 13)))?;
    top.draw(&Text::new(report.workload(), (14, 58), ("sans-serif", 13)))?;
    let mut x = 14;
    for s in &report.strategies {
        let c = color(&s.name);
        top.draw(&Rectangle::new([(x, 82), (x + 14, 96)], c.filled()))?;
        top.draw(&Text::new(s.name.clone(), (x + 19, 82), ("sans-serif", 13)))?;
        x += 34 + 8 * s.name.len() as i32;
    }
    let note = "stale: returned a version older than a write that had completed before the read began";
    top.draw(&Text::new(note, (x + 20, 83), ("sans-serif", 12).into_font().color(&RGBColor(90, 90, 90))))?;

    let areas = body.split_evenly((rows, COLUMNS));
    let names: Vec<&str> = report.strategies.iter().map(|s| s.name.as_str()).collect();
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel, &names)?;
    }
    Ok(())
}

fn database_kind(description: &str) -> &str {
    description.split(" (").next().unwrap_or(description)
}

fn draw_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Panel, names: &[&str]) -> DrawResult {
    let n = panel.values.len().max(1);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, ("sans-serif", 14).into_font().style(FontStyle::Bold))
        .margin(10)
        .margin_right(16)
        .x_label_area_size(26)
        .y_label_area_size(50);
    // Integer ranges are inclusive in plotters: 0..n-1 gives n segments.
    let x_range = (0..n - 1).into_segmented();
    let label_style = ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
    let x_label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => names.get(*i).map_or(String::new(), |s| short(s)),
        _ => String::new(),
    };
    match &panel.scale {
        Scale::Log { reference } => {
            let positive = panel.values.iter().chain(reference).copied().filter(|v| *v > 0.0);
            let min = positive.clone().fold(f64::INFINITY, f64::min);
            let max = positive.fold(0.0f64, f64::max);
            let (lo, hi) = if max > 0.0 {
                (10f64.powf((min.log10() - 0.3).floor()).min(0.5), 10f64.powf((max.log10() + 0.5).ceil()))
            } else {
                (0.5, 10.0)
            };
            let mut chart = builder.build_cartesian_2d(x_range, (lo..hi).log_scale())?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .y_desc(panel.unit)
                .y_label_formatter(&|v| compact(*v))
                .x_labels(n)
                .x_label_formatter(&x_label)
                .x_label_style(("sans-serif", 11))
                .draw()?;
            chart.draw_series(
                panel
                    .values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 0.0)
                    .map(|(i, v)| bar(i, lo, *v, color(names.get(i).copied().unwrap_or("")))),
            )?;
            chart.draw_series(panel.values.iter().zip(&panel.labels).enumerate().map(
                |(i, (v, label))| {
                    let y = if *v > 0.0 { v * 1.1 } else { lo * 1.1 };
                    Text::new(label.clone(), (SegmentValue::CenterOf(i), y), label_style.clone())
                },
            ))?;
            if let Some(r) = reference.filter(|r| *r > 0.0) {
                chart.draw_series(DashedLineSeries::new(
                    [(SegmentValue::Exact(0), r), (SegmentValue::Last, r)],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))?;
            }
        }
        Scale::StackedPercent { upper } => {
            let mut chart = builder.build_cartesian_2d(x_range, 0f64..110f64)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .y_desc(panel.unit)
                .y_labels(6)
                .y_label_formatter(&|v| if *v <= 100.0 { format!("{v:.0}") } else { String::new() })
                .x_labels(n)
                .x_label_formatter(&x_label)
                .x_label_style(("sans-serif", 11))
                .draw()?;
            for (i, (l1, l2)) in panel.values.iter().zip(upper).enumerate() {
                let c = color(names.get(i).copied().unwrap_or(""));
                if *l1 > 0.0 {
                    chart.draw_series(std::iter::once(bar(i, 0.0, *l1, c)))?;
                }
                if *l2 > 0.0 {
                    chart.draw_series(std::iter::once(bar(i, *l1, l1 + l2, light(c))))?;
                }
            }
            chart.draw_series(panel.values.iter().zip(upper).zip(&panel.labels).enumerate().map(
                |(i, ((l1, l2), label))| {
                    Text::new(label.clone(), (SegmentValue::CenterOf(i), l1 + l2 + 1.5), label_style.clone())
                },
            ))?;
        }
    }
    Ok(())
}

/// A bar of segment `i` from `from` to `to`.
fn bar(i: usize, from: f64, to: f64, c: RGBColor) -> Rectangle<(SegmentValue<usize>, f64)> {
    let mut r =
        Rectangle::new([(SegmentValue::Exact(i), from), (SegmentValue::Exact(i + 1), to)], c.filled());
    r.set_margin(0, 0, 8, 8);
    r
}

/// Short x-axis names so that five fit under a panel (the legend has the full names).
fn short(name: &str) -> String {
    match name {
        "redis-global" => "redis-gl".to_owned(),
        "near-pubsub" => "near-pub".to_owned(),
        "multi-tier" => "multi-t".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_numbers_and_ages() {
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(0.5), "0.50");
        assert_eq!(compact(3.6), "3.6");
        assert_eq!(compact(358.7), "359");
        assert_eq!(compact(1986.7), "2.0k");
        assert_eq!(compact(29_855.0), "30k");
        assert_eq!(age(0.021), "21 us");
        assert_eq!(age(4874.0), "4.9 s");
    }
}
