//! The bar charts of `peftk compare` (drawn with `plotters`): accuracy (± the standard deviation over
//! seeds), training time, peak memory and trainable parameters (log scale), one panel each, as SVG and
//! as PNG. The PNG's text is rasterized with `ab_glyph` from the DejaVu Sans font shipped in
//! `assets/fonts/` (licence beside it), so no system font library is needed.

use peft_kernels::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};
use std::sync::OnceLock;

/// One method's numbers.
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: String,
    /// (mean, standard deviation).
    pub accuracy: (f64, f64),
    pub train_s: f64,
    pub peak_mb: f64,
    pub trainable: f64,
}

const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
/// Pixels (PNG) / user units (SVG).
pub const SIZE: (u32, u32) = (1280, 860);
pub const FAMILY: &str = "sans-serif";

fn register() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| "the embedded DejaVu Sans font does not parse".to_string())
    })
    .clone()
    .map_err(Error::InvalidArgument)
}

fn plot_err(e: impl std::fmt::Debug) -> Error {
    Error::InvalidArgument(format!("drawing the comparison chart: {e:?}"))
}

/// One panel's data: a value per bar, its text, an optional ± error, the y range and axis labels.
struct Panel<'a> {
    title: &'a str,
    values: Vec<f64>,
    texts: Vec<String>,
    errors: Option<Vec<f64>>,
    y: (f64, f64),
    axis: &'a dyn Fn(f64) -> String,
    color: RGBColor,
}

/// A panel of one per-run value on a linear axis from 0, labelled with `decimals` digits.
fn linear_panel<'a>(
    bars: &[Bar],
    title: &'a str,
    f: fn(&Bar) -> f64,
    decimals: usize,
    axis: &'a dyn Fn(f64) -> String,
    color: RGBColor,
) -> Panel<'a> {
    let top = bars.iter().map(f).fold(0.0f64, f64::max);
    Panel {
        title,
        values: bars.iter().map(f).collect(),
        texts: bars.iter().map(|b| format!("{:.*}", decimals, f(b))).collect(),
        errors: None,
        y: (0.0, top.max(1.0) * 1.15),
        axis,
        color,
    }
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    labels: &[String],
    p: &Panel<'_>,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let n = labels.len();
    let mut chart = ChartBuilder::on(area)
        .caption(p.title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(72)
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), p.y.0..p.y.1)?;
    let label_of = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(n)
        .x_label_formatter(&label_of)
        .y_label_formatter(&|y| (p.axis)(*y))
        .label_style((FAMILY, 15))
        .draw()?;
    chart.draw_series(p.values.iter().enumerate().map(|(i, &v)| {
        let mut r = Rectangle::new(
            [
                (SegmentValue::Exact(i), p.y.0),
                (SegmentValue::Exact(i + 1), v.max(p.y.0)),
            ],
            p.color.filled(),
        );
        r.set_margin(0, 0, 10, 10);
        r
    }))?;
    if let Some(errs) = &p.errors {
        chart.draw_series(
            p.values
                .iter()
                .zip(errs)
                .enumerate()
                .filter(|(_, (_, e))| **e > 0.0)
                .map(|(i, (&v, &e))| {
                    PathElement::new(
                        vec![
                            (SegmentValue::CenterOf(i), (v - e).max(p.y.0)),
                            (SegmentValue::CenterOf(i), (v + e).min(p.y.1)),
                        ],
                        BLACK.stroke_width(2),
                    )
                }),
        )?;
    }
    let style = TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let top = |i: usize, v: f64| {
        let e = p.errors.as_ref().map_or(0.0, |e| e[i]);
        (v + e).max(p.y.0)
    };
    chart.draw_series(
        p.values
            .iter()
            .zip(&p.texts)
            .enumerate()
            .map(|(i, (&v, t))| Text::new(t.clone(), (SegmentValue::CenterOf(i), top(i, v)), style.clone())),
    )?;
    Ok(())
}

/// A count as 1.2k / 3.4M.
fn count(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    bars: &[Bar],
    title: &str,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let root = root.titled(title, (FAMILY, 20))?;
    let areas = root.split_evenly((2, 2));
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let acc_lo = bars
        .iter()
        .map(|b| b.accuracy.0 - b.accuracy.1)
        .fold(1.0f64, f64::min);
    let acc_lo = ((acc_lo - 0.05) * 10.0).floor().max(0.0) / 10.0;
    let pct = |y: f64| format!("{:.0}%", y * 100.0);
    let secs = |y: f64| format!("{y:.1} s");
    let mib = |y: f64| format!("{y:.0} MiB");
    let pow10 = |y: f64| {
        if (y - y.round()).abs() < 1e-6 {
            count(10f64.powf(y.round()))
        } else {
            String::new()
        }
    };
    let logs: Vec<f64> = bars.iter().map(|b| b.trainable.max(1.0).log10()).collect();
    let log_lo = logs
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .floor()
        .min(2.0);
    let log_hi = logs.iter().copied().fold(0.0, f64::max).ceil() + 0.5;
    let panels = [
        Panel {
            title: &format!("test accuracy (axis from {:.0}%)", acc_lo * 100.0),
            values: bars.iter().map(|b| b.accuracy.0).collect(),
            texts: bars
                .iter()
                .map(|b| format!("{:.1}", b.accuracy.0 * 100.0))
                .collect(),
            errors: Some(bars.iter().map(|b| b.accuracy.1).collect()),
            y: (acc_lo, 1.0),
            axis: &pct,
            color: RGBColor(52, 101, 164),
        },
        linear_panel(
            bars,
            "training time (seconds)",
            |b| b.train_s,
            1,
            &secs,
            RGBColor(204, 121, 32),
        ),
        linear_panel(
            bars,
            "peak memory (RSS, MiB)",
            |b| b.peak_mb,
            0,
            &mib,
            RGBColor(78, 154, 6),
        ),
        Panel {
            title: "trainable parameters (log scale)",
            values: logs,
            texts: bars.iter().map(|b| count(b.trainable)).collect(),
            errors: None,
            y: (log_lo, log_hi),
            axis: &pow10,
            color: RGBColor(117, 80, 123),
        },
    ];
    for (area, p) in areas.iter().zip(&panels) {
        panel(area, &labels, p)?;
    }
    root.present()
}

/// The chart as an SVG document.
pub fn svg(bars: &[Bar], title: &str) -> Result<String> {
    render_svg(|root| draw(root, bars, title))
}

/// The chart as a PNG file's bytes (8-bit RGB).
pub fn png(bars: &[Bar], title: &str) -> Result<Vec<u8>> {
    render_png(|root| draw(root, bars, title))
}

/// An SVG document of [`SIZE`] drawn by `draw` (with the embedded font registered).
pub fn render_svg<F>(draw: F) -> Result<String>
where
    F: for<'a> FnOnce(
        DrawingArea<SVGBackend<'a>, Shift>,
    ) -> std::result::Result<(), DrawingAreaErrorKind<std::io::Error>>,
{
    register()?;
    let mut s = String::new();
    draw(SVGBackend::with_string(&mut s, SIZE).into_drawing_area()).map_err(plot_err)?;
    Ok(s)
}

/// A PNG file's bytes (8-bit RGB, [`SIZE`]) drawn by `draw` (with the embedded font registered).
pub fn render_png<F>(draw: F) -> Result<Vec<u8>>
where
    F: for<'a> FnOnce(
        DrawingArea<BitMapBackend<'a>, Shift>,
    ) -> std::result::Result<
        (),
        DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>,
    >,
{
    register()?;
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    draw(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area()).map_err(plot_err)?;
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().map_err(plot_err)?;
    wr.write_image_data(&rgb).map_err(plot_err)?;
    wr.finish().map_err(plot_err)?;
    Ok(out)
}
