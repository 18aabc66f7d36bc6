//! PNG charts without a plotting stack: a small rasteriser with a built-in
//! 5×7 font, enough for training curves and comparison charts. Used by
//! `tabletrace-train` (loss and margin curves) and `tabletrace-eval` (the
//! report's accuracy charts).
//!
//! ```no_run
//! use tabletrace_plot::{line_charts, Panel, Series};
//! let loss = Series { name: "train".into(), points: vec![(1.0, 0.9), (2.0, 0.7)] };
//! let panel = Panel { title: "LOSS".into(), x_label: "STEP".into(), series: vec![loss] };
//! line_charts(&[panel], std::path::Path::new("curves.png")).unwrap();
//! ```
#![deny(missing_docs)]

mod error;

pub use error::{Error, Result};

use std::path::Path;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// `(x, y)` points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title, an x-axis label and its lines.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Lines.
    pub series: Vec<Series>,
}

const COLORS: [[u8; 3]; 6] =
    [[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189], [140, 86, 75]];
const PANEL_W: usize = 560;
const PANEL_H: usize = 380;
const SCALE: usize = 2; // font pixels per glyph pixel

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: vec![255; w * h * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x + dx - thick / 2, y + dy - thick / 2, c);
                }
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        for sx in 0..SCALE {
                            for sy in 0..SCALE {
                                let gx = x + (k * 6 * SCALE + col * SCALE + sx) as i64;
                                self.set(gx, y + (row * SCALE + sy) as i64, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Round tick values within `[lo, hi]`: multiples of 1, 2 or 5 × 10^k,
/// at most seven of them.
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| (hi - lo) / s <= 6.0).unwrap_or(10.0 * mag);
    // A bound that is a multiple of the step up to rounding (0.3 / 0.05) is one.
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    // Multiples of the step, computed from integers so that 0.1 × 3 prints as 0.3.
    (first..=last).map(|k| (k as f64 * step * 1e9).round() / 1e9).collect()
}

/// Series with more points than this are drawn faint, under their running mean.
const SMOOTH_ABOVE: usize = 50;

/// `c` mixed two thirds of the way to white.
fn tint(c: [u8; 3]) -> [u8; 3] {
    c.map(|v| (v as u16 + (255 - v as u16) * 2 / 3) as u8)
}

/// The trailing mean of the last `window` points' y at each point.
fn running_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// Width in pixels of `s` in the built-in font.
fn text_width(s: &str) -> usize {
    s.chars().count() * 6 * SCALE
}

/// Compact tick labels: `0.25`, `12`, `1.5e-4`.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Draws panels side by side into a PNG. A series of more than 50 points
/// (per-step training metrics) is drawn faint with its running mean over
/// 1/25 of its points (at least 5) on top; the legend sits on the title row.
pub fn line_charts(panels: &[Panel], path: &Path) -> Result<()> {
    if panels.is_empty() {
        return Err(Error::Empty);
    }
    let mut cv = Canvas::new(PANEL_W * panels.len(), PANEL_H);
    for (p, panel) in panels.iter().enumerate() {
        let ox = (p * PANEL_W) as f64;
        let (left, right, top, bottom) = (ox + 80.0, ox + PANEL_W as f64 - 20.0, 40.0, PANEL_H as f64 - 70.0);
        let pts: Vec<(f64, f64)> = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        cv.text(ox as i64 + 80, 10, &panel.title, [0, 0, 0]);
        let axis = [90, 90, 90];
        cv.line((left, top), (left, bottom), axis, 1);
        cv.line((left, bottom), (right, bottom), axis, 1);
        cv.text(
            ((left + right) / 2.0) as i64 - text_width(&panel.x_label) as i64 / 2,
            bottom as i64 + 30,
            &panel.x_label,
            [0, 0, 0],
        );
        if pts.is_empty() {
            cv.text(left as i64 + 20, ((top + bottom) / 2.0) as i64, "no data", axis);
            continue;
        }
        let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if x1 <= x0 {
            x0 -= 0.5;
            x1 += 0.5;
        }
        if y1 <= y0 {
            y0 -= 0.5;
            y1 += 0.5;
        }
        let pad = (y1 - y0) * 0.05;
        let (y0, y1) = (y0 - pad, y1 + pad);
        let sx = |x: f64| left + (x - x0) / (x1 - x0) * (right - left);
        let sy = |y: f64| bottom - (y - y0) / (y1 - y0) * (bottom - top);
        for yv in nice_ticks(y0, y1) {
            let y = sy(yv);
            cv.line((left - 4.0, y), (left, y), axis, 1);
            cv.line((left + 1.0, y), (right, y), [232, 232, 232], 1);
            let label = tick_label(yv);
            cv.text(left as i64 - 8 - text_width(&label) as i64, y as i64 - 7, &label, [0, 0, 0]);
        }
        for xv in nice_ticks(x0, x1) {
            let x = sx(xv);
            cv.line((x, bottom), (x, bottom + 4.0), axis, 1);
            let label = tick_label(xv);
            cv.text(x as i64 - text_width(&label) as i64 / 2, bottom as i64 + 8, &label, [0, 0, 0]);
        }
        // The legend sits on the title row, right-aligned, clear of the lines.
        let mut lx = right as i64;
        for (i, s) in panel.series.iter().enumerate().rev() {
            lx -= text_width(&s.name) as i64;
            cv.text(lx, 10, &s.name, [0, 0, 0]);
            lx -= 28;
            cv.line((lx as f64, 17.0), (lx as f64 + 20.0, 17.0), COLORS[i % COLORS.len()], 3);
            lx -= 16;
        }
        for (i, s) in panel.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let good: Vec<(f64, f64)> =
                s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            // Long noisy series (per-step losses): the raw points faint, their running mean on top.
            let smooth = good.len() > SMOOTH_ABOVE;
            let raw = if smooth { tint(c) } else { c };
            for w in good.windows(2) {
                cv.line((sx(w[0].0), sy(w[0].1)), (sx(w[1].0), sy(w[1].1)), raw, if smooth { 1 } else { 2 });
            }
            if smooth {
                let mean = running_mean(&good, (good.len() / 25).max(5));
                for w in mean.windows(2) {
                    cv.line((sx(w[0].0), sy(w[0].1)), (sx(w[1].0), sy(w[1].1)), c, 2);
                }
            }
            if good.len() == 1 {
                let (x, y) = (sx(good[0].0), sy(good[0].1));
                cv.line((x - 3.0, y), (x + 3.0, y), c, 4);
            }
        }
    }
    write_png(&cv, path)
}

/// Grouped bars: for each category, one bar per series (`values[series][category]`),
/// values in `[0, 1]` drawn as percentages. A category's name may hold two
/// lines (`\n`).
pub fn bar_chart(title: &str, categories: &[String], series: &[(String, Vec<f64>)], path: &Path) -> Result<()> {
    if categories.is_empty() || series.is_empty() {
        return Err(Error::Empty);
    }
    let w = (160 + categories.len() * (series.len() * 36 + 40)).max(560);
    let mut cv = Canvas::new(w, PANEL_H);
    let (left, right, top, bottom) = (80.0, w as f64 - 20.0, 40.0 + 20.0 * series.len() as f64, PANEL_H as f64 - 50.0);
    cv.text(80, 10, title, [0, 0, 0]);
    let axis = [90, 90, 90];
    cv.line((left, top), (left, bottom), axis, 1);
    cv.line((left, bottom), (right, bottom), axis, 1);
    let sy = |v: f64| bottom - v.clamp(0.0, 1.0) * (bottom - top);
    for k in 0..=4 {
        let v = k as f64 / 4.0;
        cv.line((left + 1.0, sy(v)), (right, sy(v)), [232, 232, 232], 1);
        let label = format!("{}%", (v * 100.0) as u32);
        cv.text(left as i64 - 8 - text_width(&label) as i64, sy(v) as i64 - 7, &label, [0, 0, 0]);
    }
    let group = (right - left) / categories.len() as f64;
    let bar = (group - 30.0) / series.len() as f64;
    for (c, cat) in categories.iter().enumerate() {
        let gx = left + group * c as f64 + 15.0;
        for (s, (_, values)) in series.iter().enumerate() {
            let v = values.get(c).copied().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let x0 = gx + bar * s as f64;
            for x in (x0 as i64 + 1)..((x0 + bar) as i64 - 1) {
                cv.line((x as f64, sy(v)), (x as f64, bottom - 1.0), COLORS[s % COLORS.len()], 1);
            }
            let label = format!("{:.0}", v * 100.0);
            cv.text((x0 + bar / 2.0) as i64 - text_width(&label) as i64 / 2, sy(v) as i64 - 18, &label, [0, 0, 0]);
        }
        for (k, line) in cat.lines().enumerate() {
            let x = (gx + group / 2.0 - 15.0) as i64 - text_width(line) as i64 / 2;
            cv.text(x, bottom as i64 + 10 + 17 * k as i64, line, [0, 0, 0]);
        }
    }
    for (s, (name, _)) in series.iter().enumerate() {
        let y = 34 + 20 * s as i64;
        cv.line((right - 220.0, y as f64 + 7.0), (right - 200.0, y as f64 + 7.0), COLORS[s % COLORS.len()], 6);
        cv.text(right as i64 - 192, y, name, [0, 0, 0]);
    }
    write_png(&cv, path)
}

/// One estimate with its 95% interval, a row of an [`interval_chart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    /// Row label (a run's name).
    pub label: String,
    /// The row's series in the other charts of a report, which gives its
    /// colour (as [`bar_chart`] colours series).
    pub series: usize,
    /// The estimate (a difference of shares: 0.05 is 5 points).
    pub value: f64,
    /// Lower end of the interval.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
}

/// Pixel height of one row of an interval chart.
const ROW_H: usize = 34;
/// Pixel width of one panel of an interval chart.
const INTERVAL_W: usize = 300;

/// Differences with their intervals, one panel per title side by side (e.g.
/// one per question set), one row per label, the same rows in every panel,
/// each in its series' colour: a dot at the value, a whisker over the interval,
/// a line at zero, and one shared x axis in percentage points, so that a
/// difference whose interval crosses zero is seen to. Labels name the rows
/// on the left.
pub fn interval_chart(title: &str, panels: &[(String, Vec<Interval>)], path: &Path) -> Result<()> {
    let rows = panels.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    if panels.is_empty() || rows == 0 {
        return Err(Error::Empty);
    }
    let labels: Vec<(&str, usize)> = panels
        .iter()
        .find(|(_, v)| v.len() == rows)
        .expect("a panel has every row")
        .1
        .iter()
        .map(|r| (r.label.as_str(), r.series))
        .collect();
    let label_w = labels.iter().map(|(l, _)| text_width(l)).max().unwrap_or(0) + 30;
    let (top, bottom_pad) = (60.0, 60.0);
    let h = top as usize + rows * ROW_H + bottom_pad as usize;
    let mut cv = Canvas::new(label_w + panels.len() * INTERVAL_W + 20, h);
    cv.text(10, 10, title, [0, 0, 0]);
    let finite = |v: f64| v.is_finite().then_some(v);
    let ends = panels.iter().flat_map(|(_, v)| v.iter().flat_map(|r| [r.lo, r.hi, r.value])).filter_map(finite);
    let (lo, hi) = ends.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v * 100.0), b.max(v * 100.0)));
    let pad = ((hi - lo) * 0.05).max(0.5);
    let (lo, hi) = (lo - pad, hi + pad);
    let bottom = top + (rows * ROW_H) as f64;
    let row_y = |i: usize| top + (i * ROW_H + ROW_H / 2) as f64;
    for (i, (l, series)) in labels.iter().enumerate() {
        cv.text(10, row_y(i) as i64 - 7, l, COLORS[series % COLORS.len()]);
    }
    let axis = [90, 90, 90];
    for (p, (name, intervals)) in panels.iter().enumerate() {
        let (left, right) = ((label_w + p * INTERVAL_W) as f64 + 10.0, (label_w + (p + 1) * INTERVAL_W) as f64 - 10.0);
        let sx = |v: f64| left + (v - lo) / (hi - lo) * (right - left);
        cv.text(((left + right) / 2.0) as i64 - text_width(name) as i64 / 2, 36, name, [0, 0, 0]);
        cv.line((left, bottom), (right, bottom), axis, 1);
        for t in nice_ticks(lo, hi) {
            let x = sx(t);
            cv.line((x, top), (x, bottom), [232, 232, 232], 1);
            cv.line((x, bottom), (x, bottom + 4.0), axis, 1);
            let label = tick_label(t);
            cv.text(x as i64 - text_width(&label) as i64 / 2, bottom as i64 + 8, &label, [0, 0, 0]);
        }
        cv.line((sx(0.0), top - 4.0), (sx(0.0), bottom), axis, 1);
        for (i, r) in intervals.iter().enumerate() {
            let c = COLORS[r.series % COLORS.len()];
            let y = row_y(i);
            if let (Some(a), Some(b)) = (finite(r.lo), finite(r.hi)) {
                cv.line((sx(a * 100.0), y), (sx(b * 100.0), y), c, 2);
                for e in [a, b] {
                    cv.line((sx(e * 100.0), y - 5.0), (sx(e * 100.0), y + 5.0), c, 2);
                }
            }
            if let Some(v) = finite(r.value) {
                cv.line((sx(v * 100.0) - 3.0, y), (sx(v * 100.0) + 3.0, y), c, 8);
            }
        }
        let unit = "POINTS";
        cv.text(((left + right) / 2.0) as i64 - text_width(unit) as i64 / 2, bottom as i64 + 30, unit, axis);
    }
    write_png(&cv, path)
}

fn write_png(cv: &Canvas, path: &Path) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::Io { path: tmp.clone(), source: e })?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), cv.w as u32, cv.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| Error::Png { path: tmp.clone(), source: e })?;
        w.write_image_data(&cv.px).map_err(|e| Error::Png { path: tmp.clone(), source: e })?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })
}

/// 5×7 glyphs, one byte per row (low five bits, left to right). Letters
/// render in capitals.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let s = Series { name: "loss".into(), points: (0..20).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect() };
        line_charts(&[Panel { title: "LOSS".into(), x_label: "STEP".into(), series: vec![s] }], &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        r.next_frame(&mut buf).unwrap();
        // Some pixels carry the first series' colour.
        assert!(buf.chunks(3).any(|p| p == COLORS[0]));
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(0.00015), "1.5e-4");
    }

    /// An interval chart: each row's whisker spans its interval on the
    /// shared axis (the zero line between), in the row's colour.
    #[test]
    fn interval_chart_draws_each_row_over_its_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.png");
        let row = |label: &str, series: usize, value: f64, lo: f64, hi: f64| Interval {
            label: label.into(),
            series,
            value,
            lo,
            hi,
        };
        let panels = vec![
            ("ALL".to_string(), vec![row("cpo", 1, 0.02, -0.01, 0.05), row("sft", 2, -0.04, -0.08, -0.01)]),
            ("UNSEEN".to_string(), vec![row("cpo", 1, 0.03, 0.0, 0.06), row("sft", 2, f64::NAN, f64::NAN, f64::NAN)]),
        ];
        interval_chart("DIFFERENCE", &panels, &path).unwrap();
        let (buf, w) = pixels(&path);
        let h = buf.len() / 3 / w;
        let at = |x: usize, y: usize| [buf[(y * w + x) * 3], buf[(y * w + x) * 3 + 1], buf[(y * w + x) * 3 + 2]];
        // Columns holding a row's colour on its line, in the first panel.
        let first_panel_end = w - 20 - INTERVAL_W;
        let labels_end = text_width("cpo") + 30;
        let span = |c: [u8; 3], y: usize| {
            let xs: Vec<usize> = (labels_end..first_panel_end).filter(|&x| at(x, y) == c).collect();
            (xs[0], *xs.last().unwrap())
        };
        let (y0, y1) = (60 + ROW_H / 2, 60 + ROW_H + ROW_H / 2);
        let (a0, a1) = span(COLORS[1], y0);
        let (b0, b1) = span(COLORS[2], y1);
        // cpo's interval (-1, +5) lies right of sft's (-8, -1), and is 6 points wide against 7.
        assert!(a0 > b0 && a1 > b1, "cpo {a0}..{a1}, sft {b0}..{b1}");
        let (wa, wb) = ((a1 - a0) as f64, (b1 - b0) as f64);
        assert!((wa / wb - 6.0 / 7.0).abs() < 0.08, "widths {wa} and {wb}");
        // The row without a difference in the second panel draws nothing there.
        assert!((first_panel_end..w).all(|x| at(x, y1) != COLORS[2]));
        assert!(h > 60 + 2 * ROW_H);
        assert!(matches!(interval_chart("X", &[], &path), Err(Error::Empty)));
    }

    /// Decoded RGB pixels and width of a PNG.
    fn pixels(path: &Path) -> (Vec<u8>, usize) {
        let dec = png::Decoder::new(std::io::Cursor::new(std::fs::read(path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        (buf, info.width as usize)
    }

    /// A long noisy series: its points faint, the running mean in full
    /// colour, and no line pixel on the legend's row or in the plot's
    /// top-right corner where the legend used to cover the lines.
    #[test]
    fn long_series_get_a_running_mean_and_the_legend_stays_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let points = (0..250).map(|i| (i as f64, if i % 2 == 0 { 3.0 } else { 1.0 })).collect();
        let s = Series { name: "train".into(), points };
        line_charts(&[Panel { title: "LOSS".into(), x_label: "STEP".into(), series: vec![s] }], &path).unwrap();
        let (buf, w) = pixels(&path);
        let at = |x: usize, y: usize| &buf[(y * w + x) * 3..(y * w + x) * 3 + 3];
        // Rows holding colour `c` right of x = 200 (past the mean's first, shorter windows).
        let rows = |y0: usize, y1: usize, c: [u8; 3]| (y0..y1).filter(|&y| (200..w).any(|x| at(x, y) == c)).count();
        // Values alternate 3, 1: the mean (2) lies mid-plot, in full colour; the raw points faint.
        let (top, bottom) = (40, PANEL_H - 70);
        let mid = (top + bottom) / 2;
        assert!(rows(mid - 4, mid + 5, COLORS[0]) > 0, "the running mean is drawn mid-plot");
        assert!(rows(top, mid - 20, tint(COLORS[0])) > 0, "the raw points are drawn faint");
        assert_eq!(rows(top, mid - 20, COLORS[0]), 0, "only the mean is in full colour");
        // The legend's swatch is on the title row, above the plot.
        assert!(rows(0, top - 10, COLORS[0]) > 0, "legend swatch on the title row");
        assert_eq!(running_mean(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)], 2), [(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]);
        assert_eq!(nice_ticks(1.0, 250.0), [50.0, 100.0, 150.0, 200.0, 250.0]);
        assert_eq!(nice_ticks(-0.056, 2.833), [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(nice_ticks(0.0, 0.3), [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]);
    }
}
