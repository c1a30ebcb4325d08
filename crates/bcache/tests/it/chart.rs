//! SVG line charts and empirical CDFs.

use std::path::Path;

use bcache::Error;
use bcache::chart::{LineChart, Series, cdf_points, write_line_chart};

fn hit_rate_series() -> Vec<Series> {
    vec![
        Series::new("lru", vec![(1e3, 0.21), (1e4, 0.48), (1e5, 0.71)]),
        Series::new("fifo", vec![(1e3, 0.18), (1e4, 0.42), (1e5, 0.66)]),
        Series::new("belady", vec![(1e3, 0.35), (1e4, 0.64), (1e5, 0.82)]),
    ]
}

fn chart_error(result: bcache::Result<()>) -> String {
    match result {
        Err(Error::Chart { message, .. }) => message,
        other => panic!("expected a chart error, got {other:?}"),
    }
}

/// The contents of every `<text>` element, trimmed.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|element| {
            let body = &element[element.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

/// Files in `dir`, to check that no temporary file is left behind.
fn files_in(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

#[test]
fn line_chart_svg_has_every_name_and_label() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hit_rate.svg");
    let chart = LineChart::new("Hit rate by capacity", "capacity (blocks)", "hit rate")
        .log_x()
        .y_range(0.0, 1.0);
    write_line_chart(&path, &chart, &hit_rate_series()).unwrap();

    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    let texts = svg_texts(&svg);
    for text in [
        "Hit rate by capacity",
        "capacity (blocks)",
        "hit rate",
        "lru",
        "fifo",
        "belady",
    ] {
        assert!(
            texts.iter().any(|t| t == text),
            "missing {text:?} in {texts:?}"
        );
    }
    // Log-axis ticks are short numbers.
    assert!(texts.iter().any(|t| t == "10000"), "{texts:?}");
    // One line per series, with markers.
    assert!(svg.matches("<polyline").count() >= 3);
    assert!(svg.contains("<circle"));
    assert_eq!(files_in(dir.path()).unwrap(), vec!["hit_rate.svg"]);
}

#[test]
fn line_chart_overwrites_and_escapes_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cdf.svg");
    std::fs::write(&path, "old").unwrap();
    let series = vec![Series::new("a<b & c", vec![(1.0, 0.5), (2.0, 1.0)])];
    write_line_chart(&path, &LineChart::new("TTFT", "ms", "fraction"), &series).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"));
    assert!(svg.contains("a&lt;b &amp; c"));
    assert_eq!(files_in(dir.path()).unwrap(), vec!["cdf.svg"]);
}

#[test]
fn line_chart_draws_degenerate_data() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "single.svg",
            vec![Series::new("one", vec![(3.0, 0.5)])],
            false,
        ),
        (
            "single_log.svg",
            vec![Series::new("one", vec![(3.0, 0.5)])],
            true,
        ),
        (
            "flat_x.svg",
            vec![Series::new("flat", vec![(0.0, 0.1), (0.0, 0.9)])],
            false,
        ),
        (
            "with_empty.svg",
            vec![
                Series::new("empty", vec![]),
                Series::new("full", vec![(1.0, 2.0), (2.0, 2.0)]),
            ],
            false,
        ),
    ];
    for (name, series, log_x) in cases {
        let path = dir.path().join(name);
        let mut chart = LineChart::new(name, "x", "y");
        chart.log_x = log_x;
        write_line_chart(&path, &chart, &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{name}");
        for s in &series {
            assert!(svg.contains(&s.name), "{name}: legend lacks {}", s.name);
        }
    }
}

#[test]
fn line_chart_rejects_nothing_to_draw() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.svg");
    let chart = LineChart::new("t", "x", "y");
    let message = chart_error(write_line_chart(&path, &chart, &[]));
    assert!(message.contains("nothing to draw"), "{message}");
    let empty = vec![Series::new("a", vec![]), Series::new("b", vec![])];
    let message = chart_error(write_line_chart(&path, &chart, &empty));
    assert!(message.contains("nothing to draw"), "{message}");
    assert!(!path.exists());
}

#[test]
fn line_chart_rejects_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.svg");
    let linear = LineChart::new("t", "x", "y");

    let log = linear.log_x();
    let series = vec![
        Series::new("fine", vec![(1.0, 1.0)]),
        Series::new("zero-capacity", vec![(0.0, 0.3)]),
    ];
    let message = chart_error(write_line_chart(&path, &log, &series));
    assert!(message.contains("zero-capacity"), "{message}");
    assert!(message.contains("log"), "{message}");

    let series = vec![Series::new("nan", vec![(1.0, f64::NAN)])];
    let message = chart_error(write_line_chart(&path, &linear, &series));
    assert!(
        message.contains("\"nan\"") && message.contains("not finite"),
        "{message}"
    );

    let series = vec![Series::new("over", vec![(1.0, 1.5)])];
    let fixed = linear.y_range(0.0, 1.0);
    let message = chart_error(write_line_chart(&path, &fixed, &series));
    assert!(
        message.contains("over") && message.contains("outside"),
        "{message}"
    );

    let series = vec![Series::new("ok", vec![(1.0, 0.5)])];
    let inverted = linear.y_range(1.0, 0.0);
    let message = chart_error(write_line_chart(&path, &inverted, &series));
    assert!(message.contains("y_range"), "{message}");
    assert!(!path.exists());
}

#[test]
fn line_chart_survives_extreme_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("extreme.svg");
    let linear = LineChart::new("t", "x", "y");
    let drawable = [
        (linear, vec![(1.0, 1.0), (1.0 + 1e-15, 1.0 + 1e-15)]),
        (linear, vec![(-1e300, 0.0), (1e300, 1.0)]),
        (linear, vec![(1e-300, 5e-324), (2e-300, 1e-323)]),
        (linear.log_x(), vec![(1e-100, 0.0), (1e100, 1.0)]),
        (linear.log_x(), vec![(1e-300, 0.0), (1e-10, 1.0)]),
    ];
    for (chart, points) in drawable {
        let series = vec![Series::new("s", points.clone())];
        write_line_chart(&path, &chart, &series).unwrap_or_else(|e| panic!("{points:?}: {e}"));
    }
    // Spans no axis can show are errors, not overflows or endless tick loops.
    let undrawable = [
        (linear, vec![(-1e308, 0.0), (1e308, 1.0)], "f64"),
        (linear, vec![(0.0, f64::MIN), (1.0, f64::MAX)], "f64"),
        (
            linear.log_x(),
            vec![(1e-300, 0.0), (1e300, 1.0)],
            "log axis",
        ),
        (
            linear.log_x(),
            vec![(5e-324, 0.0), (1e308, 1.0)],
            "log axis",
        ),
    ];
    for (chart, points, expected) in undrawable {
        let series = vec![Series::new("s", points)];
        let message = chart_error(write_line_chart(&path, &chart, &series));
        assert!(message.contains(expected), "{message}");
    }
}

#[test]
fn line_chart_reports_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/chart.svg");
    let series = vec![Series::new("a", vec![(1.0, 1.0)])];
    match write_line_chart(&path, &LineChart::new("t", "x", "y"), &series) {
        Err(Error::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected an io error, got {other:?}"),
    }
}

#[test]
fn cdf_points_are_monotone_and_end_at_one() {
    let samples: Vec<f64> = (0..1000).map(|i| f64::from((i * 7919) % 1000)).collect();
    let all = cdf_points(&samples, 10_000);
    assert_eq!(all.len(), 1000);
    assert_eq!(all[0], (0.0, 0.001));
    assert_eq!(all[999], (999.0, 1.0));
    for w in all.windows(2) {
        assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1);
    }

    let few = cdf_points(&samples, 50);
    assert_eq!(few.len(), 50);
    assert_eq!(few.first(), all.first());
    assert_eq!(few.last(), all.last());
    for w in few.windows(2) {
        assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1);
    }
    assert_eq!(cdf_points(&samples, 1), vec![(999.0, 1.0)]);
    assert!(cdf_points(&samples, 0).is_empty());
}

#[test]
fn cdf_points_handle_ties_nan_and_infinity() {
    assert!(cdf_points(&[], 10).is_empty());
    assert!(cdf_points(&[f64::NAN], 10).is_empty());
    // Ties give one point at the fraction <= x.
    assert_eq!(
        cdf_points(&[2.0, 1.0, 2.0, f64::NAN, 3.0], 10),
        vec![(1.0, 0.25), (2.0, 0.75), (3.0, 1.0)]
    );
    // An infinite sample counts but is not drawn: the curve stops below 1.
    assert_eq!(cdf_points(&[1.0, f64::INFINITY], 10), vec![(1.0, 0.5)]);
}

#[test]
fn cdf_chart_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ttft.svg");
    let series: Vec<Series> = ["lru", "bcache"]
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let samples: Vec<f64> = (0..5000)
                .map(|i| 10.0 + f64::from(i % 97) * (k as f64 + 1.0))
                .collect();
            Series::new(*name, cdf_points(&samples, 200))
        })
        .collect();
    let chart = LineChart::new("TTFT CDF", "TTFT (ms)", "fraction of requests").y_range(0.0, 1.0);
    write_line_chart(&path, &chart, &series).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    let texts = svg_texts(&svg);
    assert!(texts.iter().any(|t| t == "TTFT (ms)"), "{texts:?}");
    assert!(texts.iter().any(|t| t == "bcache"), "{texts:?}");
    // 200-point curves are plain lines: no markers.
    assert!(!svg.contains("<circle"));
}
