//! SVG line charts: hit rate against cache capacity, TTFT CDFs.
//!
//! The simulator compares policies with two pictures: one line per policy of
//! hit rate against cache capacity (usually on a log-scaled capacity axis),
//! and one empirical CDF of time-to-first-token per policy. Both are line
//! charts, so this module has one entry point, [`write_line_chart`], that
//! takes a [`LineChart`] (title, axis labels, scales) and a list of
//! [`Series`], and writes a self-contained SVG file.
//!
//! ```no_run
//! use std::path::Path;
//! use bcache::chart::{cdf_points, write_line_chart, LineChart, Series};
//!
//! # fn main() -> bcache::Result<()> {
//! // Hit rate against capacity, one line per policy.
//! let series = vec![
//!     Series::new("lru", vec![(1e3, 0.21), (1e4, 0.48), (1e5, 0.71)]),
//!     Series::new("bcache", vec![(1e3, 0.30), (1e4, 0.59), (1e5, 0.77)]),
//! ];
//! let chart = LineChart::new("Hit rate", "capacity (blocks)", "hit rate")
//!     .log_x()
//!     .y_range(0.0, 1.0);
//! write_line_chart(Path::new("hit_rate.svg"), &chart, &series)?;
//!
//! // A TTFT CDF: samples in, at most 200 points out.
//! let ttft_ms = [12.0, 15.5, 9.1, 40.2, 13.3];
//! let cdf = vec![Series::new("lru", cdf_points(&ttft_ms, 200))];
//! let chart = LineChart::new("TTFT", "TTFT (ms)", "fraction of requests").y_range(0.0, 1.0);
//! write_line_chart(Path::new("ttft_cdf.svg"), &chart, &cdf)?;
//! # Ok(())
//! # }
//! ```
//!
//! Text is written as SVG `<text>` elements and laid out by the viewer, so
//! no font files are needed to draw a chart. The file is rendered in memory
//! and then moved into place, so a reader never sees half a chart.
//!
//! Every failure is an [`Error::Chart`] naming the file (nothing to draw, a
//! non-finite value, a non-positive x on a log axis, a point outside a fixed
//! y range) or an [`Error::Io`] when the file cannot be written.

use std::ffi::OsString;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use crate::{Error, Result};

/// Width of the SVG in pixels.
const WIDTH: u32 = 800;
/// Height of the SVG in pixels.
const HEIGHT: u32 = 500;

/// Series with at most this many points get a marker on each point; denser
/// ones (a CDF, say) are drawn as plain lines, where markers would only blur.
const MAX_MARKED_POINTS: usize = 60;

/// Line colours, in series order (the Tableau 10 palette); series beyond
/// the tenth take colours from plotters' 99-colour palette.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a chart: a name for the legend and its points, drawn in the
/// order given (sort them by x for a function plot).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend entry, e.g. the policy name.
    pub name: String,
    /// The `(x, y)` points. All values must be finite.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name` with `points`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// What a line chart looks like, apart from its data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineChart<'a> {
    /// The caption above the plot.
    pub title: &'a str,
    /// The x axis description.
    pub x_label: &'a str,
    /// The y axis description.
    pub y_label: &'a str,
    /// Log-scale the x axis (every x must then be positive).
    pub log_x: bool,
    /// A fixed y range `(low, high)`, e.g. `(0.0, 1.0)` for a hit rate or a
    /// CDF; `None` fits the range to the data. Points outside a fixed range
    /// are an error rather than being drawn outside the plot.
    pub y_range: Option<(f64, f64)>,
}

impl<'a> LineChart<'a> {
    /// A chart with linear axes and a y range fitted to the data.
    pub fn new(title: &'a str, x_label: &'a str, y_label: &'a str) -> LineChart<'a> {
        LineChart {
            title,
            x_label,
            y_label,
            log_x: false,
            y_range: None,
        }
    }

    /// The same chart with a log-scaled x axis.
    pub fn log_x(self) -> LineChart<'a> {
        LineChart {
            log_x: true,
            ..self
        }
    }

    /// The same chart with the y axis fixed to `low..=high`.
    pub fn y_range(self, low: f64, high: f64) -> LineChart<'a> {
        LineChart {
            y_range: Some((low, high)),
            ..self
        }
    }
}

/// Draws `series` as lines, a grid, axis labels and a legend, and writes
/// the SVG (800 x 500) to `path`.
///
/// Each series gets its own colour (ten distinct ones, then a wider
/// palette) and, when it has at most 60 points, a marker on every point.
///
/// Ranges are fitted to the data with a small margin; a single point or a
/// zero-width x range is padded so that it still shows. Series with no
/// points appear in the legend only, but at least one point overall is
/// needed. The file is written to a temporary name next to `path` and
/// renamed over it.
///
/// # Errors
///
/// [`Error::Chart`] when there is nothing to draw, a value is NaN or
/// infinite, `log_x` is set and a series has an x ≤ 0, the fixed y range is
/// empty or not finite, a point lies outside it, or the values span more
/// than an axis can show (beyond f64, or about 300 decades on a log axis);
/// messages about a point name its series and index. [`Error::Io`] when the
/// file cannot be written.
pub fn write_line_chart(path: &Path, chart: &LineChart, series: &[Series]) -> Result<()> {
    let fail = |message: String| Error::Chart {
        path: path.to_path_buf(),
        message,
    };
    let bounds = data_bounds(chart, series).map_err(fail)?;
    let y = match chart.y_range {
        Some((low, high)) => low..high,
        None => fit(
            pad_linear(bounds.y_min, bounds.y_max),
            bounds.y_min,
            bounds.y_max,
            false,
        ),
    };
    if !usable(&y, false) {
        return Err(fail("y values span more than f64 can represent".into()));
    }

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        let drawn = if chart.log_x {
            let x = fit(
                pad_log(bounds.x_min, bounds.x_max),
                bounds.x_min,
                bounds.x_max,
                true,
            );
            if !usable(&x, true) {
                return Err(fail(
                    "x values span more than a log axis can show (over 300 decades)".into(),
                ));
            }
            draw(&root, chart, series, x.log_scale(), y)
        } else {
            let x = fit(
                pad_linear(bounds.x_min, bounds.x_max),
                bounds.x_min,
                bounds.x_max,
                false,
            );
            if !usable(&x, false) {
                return Err(fail("x values span more than f64 can represent".into()));
            }
            draw(&root, chart, series, x, y)
        };
        drawn
            .and_then(|()| root.present().map_err(|e| e.to_string()))
            .map_err(|e| fail(format!("drawing failed: {e}")))?;
    }
    write_atomically(path, &svg)
}

/// An empirical CDF of `samples` for plotting: points `(x, fraction of
/// samples ≤ x)`, with x increasing and the fraction rising to 1.
///
/// One point is made per distinct value; when there are more than
/// `max_points`, points are kept at evenly spaced ranks (quantiles), always
/// including the smallest and largest value, so a long tail keeps its
/// extreme. NaN samples are ignored. Infinite samples count towards the
/// fractions but make no point, so with `+inf` samples (say, requests that
/// never got a first token) the curve stops below 1 — which is the truth.
/// Empty input, or `max_points == 0`, gives an empty vec; `max_points == 1`
/// keeps only the largest value.
pub fn cdf_points(samples: &[f64], max_points: usize) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() || max_points == 0 {
        return Vec::new();
    }
    sorted.sort_unstable_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut points: Vec<(f64, f64)> = Vec::new();
    for (i, &value) in sorted.iter().enumerate() {
        let last_of_run = sorted.get(i + 1).is_none_or(|next| *next != value);
        if last_of_run && value.is_finite() {
            points.push((value, (i + 1) as f64 / n));
        }
    }
    let m = points.len();
    if m <= max_points {
        return points;
    }
    if max_points == 1 {
        return points.split_off(m - 1);
    }
    // Ranks 0 and m - 1 are kept; the step is above 1, so indices are distinct.
    let step = (m - 1) as f64 / (max_points - 1) as f64;
    (0..max_points)
        .filter_map(|j| points.get(((j as f64 * step).round() as usize).min(m - 1)))
        .copied()
        .collect()
}

/// The extent of all points of all series.
struct Bounds {
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
}

/// Checks every point and returns the extent of the data.
fn data_bounds(chart: &LineChart, series: &[Series]) -> std::result::Result<Bounds, String> {
    if let Some((low, high)) = chart.y_range
        && !(low.is_finite() && high.is_finite() && low < high)
    {
        return Err(format!(
            "y_range ({low}, {high}) must be finite with low < high"
        ));
    }
    let mut bounds: Option<Bounds> = None;
    for s in series {
        for (i, &(x, y)) in s.points.iter().enumerate() {
            if !(x.is_finite() && y.is_finite()) {
                return Err(format!(
                    "series {:?}: point {i} ({x}, {y}) is not finite",
                    s.name
                ));
            }
            if chart.log_x && x <= 0.0 {
                return Err(format!(
                    "series {:?}: point {i} has x = {x}, but a log-scaled x axis needs x > 0",
                    s.name
                ));
            }
            if let Some((low, high)) = chart.y_range
                && (y < low || y > high)
            {
                return Err(format!(
                    "series {:?}: point {i} has y = {y}, outside the y range [{low}, {high}]",
                    s.name
                ));
            }
            bounds = Some(match bounds {
                None => Bounds {
                    x_min: x,
                    x_max: x,
                    y_min: y,
                    y_max: y,
                },
                Some(b) => Bounds {
                    x_min: b.x_min.min(x),
                    x_max: b.x_max.max(x),
                    y_min: b.y_min.min(y),
                    y_max: b.y_max.max(y),
                },
            });
        }
    }
    bounds.ok_or_else(|| {
        if series.is_empty() {
            "nothing to draw: no series".to_string()
        } else {
            format!(
                "nothing to draw: all {} series have no points",
                series.len()
            )
        }
    })
}

/// A linear axis range around `[min, max]` with a 3% margin; a zero-width
/// range is widened by 10% of the value (or by 1 around zero).
fn pad_linear(min: f64, max: f64) -> Range<f64> {
    let width = max - min;
    let pad = if width > 0.0 {
        width * 0.03
    } else if min != 0.0 {
        min.abs() * 0.1
    } else {
        1.0
    };
    (min - pad)..(max + pad)
}

/// A log axis range around `[min, max]` (both positive) with a margin of 3%
/// of the decades spanned; a single value gets a factor of 2 either side.
fn pad_log(min: f64, max: f64) -> Range<f64> {
    let factor = if max > min {
        // Through logarithms, so that a huge span cannot overflow.
        ((max.ln() - min.ln()) * 0.03).exp()
    } else {
        2.0
    };
    (min / factor)..(max * factor)
}

/// A short axis tick label: at most 4 decimals with trailing zeros cut
/// (`0.25`, `1000`), exponent form for very large or very small values
/// (`2.5e6`, `1e-5`).
fn tick_label(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude != 0.0 && !(1e-4..1e6).contains(&magnitude) {
        return format!("{v:e}");
    }
    let fixed = format!("{v:.4}");
    let trimmed = fixed.trim_end_matches('0').trim_end_matches('.');
    match trimmed {
        "-0" | "" => "0".to_string(),
        t => t.to_string(),
    }
}

/// `padded`, unless its margin overflows (values near the limits of f64):
/// then the bare data range, if that has a width. What is still unusable is
/// rejected by the caller.
fn fit(padded: Range<f64>, min: f64, max: f64, log: bool) -> Range<f64> {
    if usable(&padded, log) || min >= max {
        padded
    } else {
        min..max
    }
}

/// Whether plotters can draw an axis over `range`: finite width, and on a
/// log axis a positive start and a finite ratio of the ends (plotters'
/// tick placement loops without end on an infinite ratio).
fn usable(range: &Range<f64>, log: bool) -> bool {
    if log {
        range.start > 0.0 && (range.end / range.start).is_finite()
    } else {
        (range.end - range.start).is_finite()
    }
}

/// The colour of series `index`.
fn colour(index: usize) -> RGBAColor {
    match COLOURS.get(index) {
        Some(c) => c.to_rgba(),
        None => Palette99::pick(index).to_rgba(),
    }
}

/// Draws the chart on `root` with the given x axis (linear or log).
fn draw<X>(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    chart: &LineChart,
    series: &[Series],
    x: X,
    y: Range<f64>,
) -> std::result::Result<(), String>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let mut ctx = ChartBuilder::on(root)
        .caption(chart.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .light_line_style(BLACK.mix(0.08))
        .bold_line_style(BLACK.mix(0.2))
        .draw()
        .map_err(err)?;
    for (index, s) in series.iter().enumerate() {
        let c = colour(index);
        let marker = if s.points.len() <= MAX_MARKED_POINTS {
            3
        } else {
            0
        };
        ctx.draw_series(
            LineSeries::new(s.points.iter().copied(), c.stroke_width(2)).point_size(marker),
        )
        .map_err(err)?
        .label(s.name.as_str())
        .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], c.stroke_width(2)));
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Writes `contents` to a fresh temporary file next to `path`, then renames
/// it over `path`, so readers see either the old file or the whole new one.
fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some(file_name) = path.file_name() else {
        return Err(Error::Chart {
            path: path.to_path_buf(),
            message: "the path has no file name".into(),
        });
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(tmp_name);
    if let Err(e) = std::fs::write(&tmp, contents) {
        // A partial temporary file is of no use to anyone.
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_widens_degenerate_ranges() {
        assert_eq!(pad_linear(0.0, 0.0), -1.0..1.0);
        let r = pad_linear(5.0, 5.0);
        assert!(r.start < 5.0 && r.end > 5.0);
        let r = pad_log(10.0, 10.0);
        assert_eq!(r, 5.0..20.0);
        let r = pad_log(1.0, 1000.0);
        assert!(r.start < 1.0 && r.start > 0.0 && r.end > 1000.0);
    }

    #[test]
    fn tick_labels_are_short() {
        for (v, label) in [
            (0.0, "0"),
            (-0.0, "0"),
            (0.1 + 0.2, "0.3"),
            (0.25, "0.25"),
            (1000.0, "1000"),
            (100_000.0, "100000"),
            (2.5e6, "2.5e6"),
            (1e-5, "1e-5"),
            (-12.5, "-12.5"),
        ] {
            assert_eq!(tick_label(v), label, "{v}");
        }
    }
}
