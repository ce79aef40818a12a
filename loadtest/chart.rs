//! `--report FILE`: hand-written SVG charts (throughput per second with
//! failures marked; latency percentile curves p0..p99.99 from the run's
//! histograms) and a self-contained HTML page with them and the summary
//! table. No scripts, no external resources.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::report::{Hists, Summary};
use crate::series::Point;

const W: f64 = 860.0;
const H: f64 = 300.0;
/// Plot area margins: left, right, top, bottom.
const ML: f64 = 70.0;
const MR: f64 = 20.0;
const MT: f64 = 36.0;
const MB: f64 = 44.0;
/// Highest "nines" on the percentile axis: 4 = p99.99.
const MAX_NINES: f64 = 4.0;
const ACCEPTED_COLOR: &str = "#1f77b4";
const FAIL_COLOR: &str = "#d62728";
const CONNECT_COLOR: &str = "#ff7f0e";

/// Escapes text for HTML and SVG (element content and attribute values).
pub fn esc(s: &str) -> String {
    shardmta::http::inject::html_escape(s)
}

/// Smallest 1, 2 or 5 times a power of ten that is >= v (v > 0).
fn nice_ceil(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v * (1.0 - 1e-9) {
            return m * p;
        }
    }
    10.0 * p
}

/// Microseconds as a short label: 850µs, 1.2ms, 3s.
pub fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{}s", trim(us / 1e6))
    } else if us >= 1e3 {
        format!("{}ms", trim(us / 1e3))
    } else {
        format!("{}µs", trim(us))
    }
}

fn trim(v: f64) -> String {
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn frame(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r##"<rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/><text x="{ML}" y="22" font-size="15" font-weight="bold">{}</text><rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##,
        esc(title),
        pw = W - ML - MR,
        ph = H - MT - MB,
    );
}

fn hline(out: &mut String, y: f64, label: &str) {
    let _ = write!(
        out,
        r##"<line x1="{ML}" y1="{y:.1}" x2="{x2}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{tx}" y="{ty:.1}" font-size="11" text-anchor="end">{}</text>"##,
        esc(label),
        x2 = W - MR,
        tx = ML - 6.0,
        ty = y + 4.0,
    );
}

fn vtick(out: &mut String, x: f64, label: &str) {
    let _ = write!(
        out,
        r##"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{y2}" stroke="#e3e3e3"/><text x="{x:.1}" y="{ty}" font-size="11" text-anchor="middle">{}</text>"##,
        esc(label),
        y1 = MT,
        y2 = H - MB,
        ty = H - MB + 16.0,
    );
}

fn axis_label(out: &mut String, x: f64, y: f64, text: &str, rotate: bool) {
    let rot = if rotate {
        format!(r#" transform="rotate(-90 {x} {y})""#)
    } else {
        String::new()
    };
    let _ = write!(
        out,
        r##"<text x="{x}" y="{y}" font-size="12" text-anchor="middle"{rot}>{}</text>"##,
        esc(text)
    );
}

fn legend(out: &mut String, items: &[(&str, &str)]) {
    let mut x = W - MR - 10.0;
    for (label, color) in items.iter().rev() {
        let w = 24.0 + 7.0 * label.chars().count() as f64;
        x -= w;
        let _ = write!(
            out,
            r##"<rect x="{x:.1}" y="12" width="14" height="10" fill="{color}"/><text x="{tx:.1}" y="21" font-size="11">{}</text>"##,
            esc(label),
            tx = x + 18.0,
        );
    }
}

/// Throughput chart body (no outer `<svg>`): accepted msgs/s per second as a
/// line, failures per second (4xx + 5xx + connection errors) as red bars
/// with at least a visible sliver, each with a tooltip.
pub fn throughput_chart(series: &[Point]) -> String {
    let mut out = String::new();
    frame(&mut out, "Throughput: accepted messages per second");
    legend(
        &mut out,
        &[
            ("accepted/s", ACCEPTED_COLOR),
            ("failed/s (4xx, 5xx, conn)", FAIL_COLOR),
        ],
    );
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let n = series.len().max(1) as f64;
    let rate = |p: &Point, v: u64| {
        if p.span_s > 0.0 {
            v as f64 / p.span_s
        } else {
            0.0
        }
    };
    let ymax = nice_ceil(
        series
            .iter()
            .map(|p| rate(p, p.accepted).max(rate(p, p.failures())))
            .fold(1.0, f64::max),
    );
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        hline(&mut out, MT + ph - ph * v / ymax, &trim(v));
    }
    let step = nice_ceil(n / 10.0).max(1.0);
    let mut t = 0.0;
    while t <= n + 1e-9 {
        vtick(&mut out, ML + pw * t / n, &format!("{t:.0}"));
        t += step;
    }
    axis_label(
        &mut out,
        ML + pw / 2.0,
        H - 8.0,
        "seconds since start",
        false,
    );
    axis_label(&mut out, 16.0, MT + ph / 2.0, "messages / s", true);
    if series.is_empty() {
        axis_label(&mut out, ML + pw / 2.0, MT + ph / 2.0, "no data", false);
        return out;
    }
    let bar_w = (pw / n * 0.6).max(1.0);
    for p in series.iter().filter(|p| p.failures() > 0) {
        let hgt = (ph * rate(p, p.failures()) / ymax).max(4.0);
        let x = ML + pw * (p.t as f64 + 0.5) / n - bar_w / 2.0;
        let _ = write!(
            out,
            r##"<rect class="fail" x="{x:.1}" y="{y:.1}" width="{bar_w:.1}" height="{hgt:.1}" fill="{FAIL_COLOR}" opacity="0.8"><title>second {}: {} failed (4xx {}, 5xx {}, conn {})</title></rect>"##,
            p.t,
            p.failures(),
            p.tempfail,
            p.permfail,
            p.conn_errors,
            y = MT + ph - hgt,
        );
    }
    // A last second shorter than 0.2 s gives a noisy rate: left out of the line.
    let shown: Vec<&Point> = series
        .iter()
        .filter(|p| p.span_s >= 0.2 || series.len() == 1)
        .collect();
    let pts: Vec<String> = shown
        .iter()
        .map(|p| {
            format!(
                "{:.1},{:.1}",
                ML + pw * (p.t as f64 + 0.5) / n,
                MT + ph - ph * p.accepted_rate() / ymax
            )
        })
        .collect();
    let _ = write!(
        out,
        r##"<polyline class="accepted" fill="none" stroke="{ACCEPTED_COLOR}" stroke-width="2" points="{}"/>"##,
        pts.join(" ")
    );
    if shown.len() <= 120 {
        for (p, xy) in shown.iter().zip(&pts) {
            let (x, y) = xy.split_once(',').unwrap_or(("0", "0"));
            let lat = match (p.p50_us, p.p99_us) {
                (Some(a), Some(b)) => format!(
                    ", DATA-end-to-250 p50 {} p99 {}",
                    fmt_us(a as f64),
                    fmt_us(b as f64)
                ),
                _ => String::new(),
            };
            let _ = write!(
                out,
                r##"<circle cx="{x}" cy="{y}" r="2.5" fill="{ACCEPTED_COLOR}"><title>second {}: {:.0} accepted/s{lat}</title></circle>"##,
                p.t,
                p.accepted_rate()
            );
        }
    }
    out
}

/// Value at each point of the "nines" axis: x = -log10(1 - q), 0..=4.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=80)
        .map(|i| {
            let x = f64::from(i) * MAX_NINES / 80.0;
            let q = 1.0 - 10f64.powf(-x);
            let v = if i == 0 {
                h.min()
            } else {
                h.value_at_quantile(q)
            };
            (x, v.max(1))
        })
        .collect()
}

/// Latency chart body: percentile curves on a log scale for DATA-end-to-250
/// and connect.
pub fn latency_chart(hists: &Hists) -> String {
    let mut out = String::new();
    frame(&mut out, "Latency distribution (percentile, log scale)");
    let curves = [
        (
            "DATA end to 250",
            ACCEPTED_COLOR,
            percentile_curve(&hists.data_to_250),
        ),
        ("connect", CONNECT_COLOR, percentile_curve(&hists.connect)),
    ];
    legend(
        &mut out,
        &[
            ("DATA end to 250", ACCEPTED_COLOR),
            ("connect", CONNECT_COLOR),
        ],
    );
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let all = curves.iter().flat_map(|c| c.2.iter().map(|p| p.1 as f64));
    let (lo, hi) = all.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo_dec = if lo == f64::MAX {
        0.0
    } else {
        lo.log10().floor()
    };
    let hi_dec = hi.log10().ceil().max(lo_dec + 1.0);
    let ypos = |v: f64| MT + ph - ph * (v.max(1.0).log10() - lo_dec) / (hi_dec - lo_dec);
    let mut d = lo_dec;
    while d <= hi_dec + 1e-9 {
        hline(&mut out, ypos(10f64.powf(d)), &fmt_us(10f64.powf(d)));
        d += 1.0;
    }
    for (x, label) in [
        (0.0, "p0"),
        (std::f64::consts::LOG10_2, "p50"),
        (1.0, "p90"),
        (2.0, "p99"),
        (3.0, "p99.9"),
        (4.0, "p99.99"),
    ] {
        vtick(&mut out, ML + pw * x / MAX_NINES, label);
    }
    axis_label(&mut out, ML + pw / 2.0, H - 8.0, "percentile", false);
    axis_label(&mut out, 16.0, MT + ph / 2.0, "latency", true);
    if curves.iter().all(|c| c.2.is_empty()) {
        axis_label(&mut out, ML + pw / 2.0, MT + ph / 2.0, "no data", false);
    }
    for (name, color, pts) in &curves {
        if pts.is_empty() {
            continue;
        }
        let xy: Vec<String> = pts
            .iter()
            .map(|&(x, v)| format!("{:.1},{:.1}", ML + pw * x / MAX_NINES, ypos(v as f64)))
            .collect();
        let _ = write!(
            out,
            r##"<polyline class="latency" fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{}</title></polyline>"##,
            xy.join(" "),
            esc(name)
        );
    }
    out
}

fn svg_open(out: &mut String, h: f64) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"##
    );
}

/// Both charts stacked in one standalone SVG document.
pub fn render_svg(summary: &Summary, hists: &Hists) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    svg_open(&mut out, 2.0 * H + 10.0);
    out.push_str(&throughput_chart(&summary.series));
    let _ = write!(out, r#"<g transform="translate(0 {})">"#, H + 10.0);
    out.push_str(&latency_chart(hists));
    out.push_str("</g></svg>\n");
    out
}

fn row(out: &mut String, k: &str, v: &str) {
    let _ = writeln!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
}

/// A self-contained HTML page: summary table, both charts, the latency table
/// and the run's options.
pub fn render_html(summary: &Summary, hists: &Hists) -> String {
    let s = summary;
    let mut out = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>shardmta-loadtest report</title><style>\
         body{font-family:sans-serif;margin:24px;color:#222}\
         table{border-collapse:collapse;margin:8px 0 20px}\
         th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}\
         th{background:#f4f4f4}td.l,th.l{text-align:left}\
         .err{color:#d62728;font-weight:bold}svg{display:block;margin:12px 0}\
         </style></head><body>\n<h1>shardmta-loadtest report</h1>\n",
    );
    if let Some(why) = &s.aborted {
        let _ = writeln!(out, "<p class=\"err\">Run aborted: {}</p>", esc(why));
    }
    let failures = s.tempfail + s.permfail + s.conn_errors;
    let _ = writeln!(
        out,
        "<p{}>{} accepted, {} failed (4xx {}, 5xx {}, connection errors {}) in {:.3} s: {:.1} msgs/s.</p>",
        if failures > 0 { " class=\"err\"" } else { "" },
        s.accepted,
        failures,
        s.tempfail,
        s.permfail,
        s.conn_errors,
        s.elapsed_s,
        s.msgs_per_s
    );
    out.push_str("<table>\n");
    row(&mut out, "sent (final reply)", &s.sent.to_string());
    row(&mut out, "accepted", &s.accepted.to_string());
    row(&mut out, "tempfail (4xx)", &s.tempfail.to_string());
    row(&mut out, "permfail (5xx)", &s.permfail.to_string());
    row(&mut out, "connection errors", &s.conn_errors.to_string());
    for (k, v) in s.conn_error_kinds.iter().filter(|(_, v)| **v > 0) {
        row(&mut out, &format!("  {k}"), &v.to_string());
    }
    row(
        &mut out,
        "recipients rejected",
        &s.rcpt_rejected.to_string(),
    );
    row(&mut out, "elapsed", &format!("{:.3} s", s.elapsed_s));
    row(&mut out, "messages / s", &format!("{:.1}", s.msgs_per_s));
    out.push_str("</table>\n");
    svg_open(&mut out, H);
    out.push_str(&throughput_chart(&s.series));
    out.push_str("</svg>\n");
    if s.series_truncated {
        out.push_str("<p class=\"err\">Series truncated (run longer than one week).</p>\n");
    }
    svg_open(&mut out, H);
    out.push_str(&latency_chart(hists));
    out.push_str("</svg>\n<table>\n<tr><th class=\"l\">latency</th>");
    for h in ["p50", "p90", "p99", "p99.9", "max", "mean", "count"] {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr>\n");
    for r in &s.latency_us {
        let _ = write!(out, "<tr><td class=\"l\">{}</td>", esc(r.name));
        if r.count == 0 {
            out.push_str(&"<td>-</td>".repeat(6));
        } else {
            for v in [r.p50, r.p90, r.p99, r.p999, r.max] {
                let _ = write!(out, "<td>{}</td>", esc(&fmt_us(v as f64)));
            }
            let _ = write!(out, "<td>{}</td>", esc(&fmt_us(r.mean)));
        }
        let _ = writeln!(out, "<td>{}</td></tr>", r.count);
    }
    out.push_str("</table>\n<h2>Options</h2>\n<table>\n");
    if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(&s.config) {
        for (k, v) in m {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            let _ = writeln!(
                out,
                "<tr><th class=\"l\">{}</th><td class=\"l\">{}</td></tr>",
                esc(&k),
                esc(&v)
            );
        }
    }
    out.push_str("</table>\n</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{record, Counters, RunConfig};
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    fn point(t: u64, accepted: u64, permfail: u64) -> Point {
        Point {
            t,
            span_s: 1.0,
            accepted,
            tempfail: 0,
            permfail,
            conn_errors: 0,
            p50_us: Some(900),
            p99_us: Some(2000),
        }
    }

    fn sample() -> (Summary, Hists) {
        let c = Counters::default();
        c.accepted.store(300, Relaxed);
        c.permfail.store(2, Relaxed);
        let mut h = Hists::new().expect("hists");
        for us in 1..=1000u64 {
            record(&mut h.data_to_250, Duration::from_micros(100 + us * 3));
        }
        record(&mut h.connect, Duration::from_micros(80));
        let cfg = RunConfig::sample(2, 302);
        let mut s = Summary::build(&c, &h, Duration::from_secs(3), None, cfg);
        s.series = vec![point(0, 100, 0), point(1, 100, 2), point(2, 100, 0)];
        (s, h)
    }

    #[test]
    fn nice_numbers_and_labels() {
        assert_eq!(nice_ceil(0.7), 1.0);
        assert_eq!(nice_ceil(1.0), 1.0);
        assert_eq!(nice_ceil(1.2), 2.0);
        assert_eq!(nice_ceil(31_000.0), 50_000.0);
        assert_eq!(nice_ceil(0.0), 1.0);
        assert_eq!(fmt_us(850.0), "850µs");
        assert_eq!(fmt_us(1250.0), "1.25ms");
        assert_eq!(fmt_us(3_000_000.0), "3s");
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn percentile_curve_is_monotonic_from_p0_to_p9999() {
        let (_, h) = sample();
        let c = percentile_curve(&h.data_to_250);
        assert_eq!(c.len(), 81);
        assert_eq!(c[0].0, 0.0);
        assert!((c[80].0 - 4.0).abs() < 1e-9);
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!((100..=110).contains(&c[0].1), "p0 {}", c[0].1);
        assert!(percentile_curve(&h.scheduled_to_250).is_empty());
    }

    #[test]
    fn svg_has_both_charts_and_marks_failures() {
        let (s, h) = sample();
        let svg = render_svg(&s, &h);
        assert!(svg.starts_with("<?xml"));
        assert_eq!(svg.matches("<svg ").count(), 1);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("class=\"accepted\""));
        assert_eq!(svg.matches("class=\"fail\"").count(), 1);
        assert!(svg.contains("second 1: 2 failed (4xx 0, 5xx 2, conn 0)"));
        assert_eq!(svg.matches("class=\"latency\"").count(), 2);
        assert!(svg.contains(">p99.99<"));
        // Balanced elements.
        assert_eq!(svg.matches("<g ").count(), svg.matches("</g>").count());
    }

    #[test]
    fn html_is_self_contained() {
        let (s, h) = sample();
        let html = render_html(&s, &h);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert_eq!(html.matches("<svg ").count(), 2);
        assert!(html.contains("<table>"));
        assert!(html.contains("<th>permfail (5xx)</th><td>2</td>"));
        assert!(html.contains("127.0.0.1:2525"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("http://") || html.matches("http://").count() == 2);
        assert!(!html.contains("https://"));
    }

    #[test]
    fn empty_run_still_renders() {
        let (mut s, _) = sample();
        s.series.clear();
        let h = Hists::new().expect("hists");
        let svg = render_svg(&s, &h);
        assert_eq!(svg.matches("no data").count(), 2);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
