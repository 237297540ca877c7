//! `--plot FILE.svg`: throughput and latency percentiles per scenario, as
//! grouped bars (plotters, SVG backend only).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Row;

/// One coloured bar per scenario.
struct Series {
    name: &'static str,
    colour: RGBColor,
    values: Vec<f64>,
}

/// Draws the throughput (database ceiling vs bridged) and the latency
/// percentiles (plain watcher vs through the bridge) of every row.
pub(crate) fn plot(rows: &[Row], path: &Path) -> Result<(), String> {
    let labels: Vec<String> = rows.iter().map(label).collect();
    let series = |name, colour, figure: fn(&Row) -> f64| Series {
        name,
        colour,
        values: rows.iter().map(figure).collect(),
    };
    // One chart above the other, wide enough for every scenario's label.
    let width = (170 * labels.len() as u32).max(900);
    let root = SVGBackend::new(path, (width, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(450);
    let blue = |shade: u8| RGBColor(shade, shade + 60, 220);
    let orange = |shade: u8| RGBColor(240, shade + 60, shade);
    let throughput = [
        series("database ceiling", blue(120), |r| r.ceiling_per_s),
        series("through the bridge", orange(100), |r| r.bridged_per_s),
    ];
    grouped_bars(&top, "Throughput", "changes/s", &labels, &throughput, false)?;
    let latency = [
        series("plain p50", blue(170), |r| r.plain_p50_ms),
        series("plain p99", blue(110), |r| r.plain_p99_ms),
        series("plain p99.9", blue(40), |r| r.plain_p999_ms),
        series("bridged p50", orange(170), |r| r.bridged_p50_ms),
        series("bridged p99", orange(100), |r| r.bridged_p99_ms),
        series("bridged p99.9", orange(20), |r| r.bridged_p999_ms),
    ];
    let caption = "Latency, write to subscriber (log scale)";
    grouped_bars(&bottom, caption, "ms", &labels, &latency, true)?;
    root.present().map_err(|e| e.to_string())
}

/// How the fan-out grows with the number of subscribers: the slowest
/// subscriber's p99, the bridge's CPU per delivery and its peak memory.
pub(crate) fn plot_fanout(rows: &[Row], path: &Path) -> Result<(), String> {
    let labels: Vec<String> = rows
        .iter()
        .map(|r| format!("{} subscribers @{}/s", r.subscribers, r.target_rate))
        .collect();
    let one = |name, colour, figure: fn(&Row) -> f64| {
        [Series {
            name,
            colour,
            values: rows.iter().map(figure).collect(),
        }]
    };
    let width = (220 * labels.len() as u32).max(700);
    let root = SVGBackend::new(path, (width, 1050)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let charts = root.split_evenly((3, 1));
    let latency = one("slowest subscriber's p99", RGBColor(240, 120, 40), |r| {
        r.slowest_p99_ms
    });
    grouped_bars(
        &charts[0],
        "Latency, write to the slowest subscriber",
        "ms",
        &labels,
        &latency,
        false,
    )?;
    let cpu = one("bridge CPU per delivery", RGBColor(60, 120, 220), |r| {
        r.bridge_cpu_us_per_delivery
    });
    grouped_bars(
        &charts[1],
        "The bridge's CPU per delivery",
        "µs",
        &labels,
        &cpu,
        false,
    )?;
    let rss = one("bridge peak RSS", RGBColor(90, 170, 90), |r| {
        r.bridge_peak_rss_mb
    });
    grouped_bars(
        &charts[2],
        "The bridge's memory",
        "MB",
        &labels,
        &rss,
        false,
    )?;
    root.present().map_err(|e| e.to_string())
}

/// What the x axis says for a row: the path, and what differs between
/// scenarios of one matrix.
fn label(r: &Row) -> String {
    let mut s = r.path.clone();
    if r.subscribers != 1 {
        s.push_str(&format!(" ×{}", r.subscribers));
    }
    if r.target_rate != 0 {
        s.push_str(&format!(" @{}/s", r.target_rate));
    }
    // keys the bridge knew beyond those this run wrote: the preload
    let preloaded = (r.keys_known as u64).saturating_sub(r.written);
    if preloaded >= 1000 {
        s.push_str(&format!(" +{}k keys", preloaded / 1000));
    }
    s
}

fn grouped_bars(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    caption: &str,
    unit: &str,
    labels: &[String],
    series: &[Series],
    log: bool,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    let n = labels.len();
    let all = series.iter().flat_map(|s| s.values.iter().copied());
    let top = all.clone().fold(0.0, f64::max).max(1e-3) * if log { 2.0 } else { 1.15 };
    let bottom = if log {
        all.filter(|v| *v > 0.0).fold(top, f64::min) / 2.0
    } else {
        0.0
    };
    // Group i spans [i, i+1); its label is drawn under its middle.
    let x = 0.0..n as f64;
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let width = 0.8 / series.len() as f64;
    let bar = |s: &Series, k: usize, i: usize, base: f64| {
        let left = i as f64 + 0.1 + k as f64 * width;
        Rectangle::new(
            [(left, base), (left + width * 0.9, s.values[i].max(base))],
            s.colour.filled(),
        )
    };
    let label_style = ("sans-serif", 13)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Center, VPos::Top));
    // The two kinds of y axis are different types: one body, twice.
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_label_formatter(&|v: &f64| format!("{v}"))
                .y_desc(unit)
                .draw()
                .map_err(err)?;
            for (k, s) in series.iter().enumerate() {
                chart
                    .draw_series((0..n).map(|i| bar(s, k, i, bottom)))
                    .map_err(err)?
                    .label(s.name)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], s.colour.filled())
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(err)?;
            let (x0, y0) = area.get_base_pixel();
            for (i, text) in labels.iter().enumerate() {
                let (px, py) = chart.backend_coord(&(i as f64 + 0.5, bottom));
                area.draw(&Text::new(
                    text.as_str(),
                    (px - x0, py - y0 + 6),
                    &label_style,
                ))
                .map_err(err)?;
            }
        }};
    }
    if log {
        draw!(builder
            .build_cartesian_2d(x, (bottom..top).log_scale())
            .map_err(err)?);
    } else {
        draw!(builder.build_cartesian_2d(x, bottom..top).map_err(err)?);
    }
    Ok(())
}
