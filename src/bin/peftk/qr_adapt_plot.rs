//! `pareto.svg` / `pareto.png` of `peftk qr-adapt`: validation score against memory for every
//! evaluated configuration (low fidelity), the feasible front highlighted, the uniform 4-bit QLoRA
//! references, the budget line and the chosen configuration. Drawn with `plotters` through the font
//! and PNG helpers of [`crate::plot`].

use crate::plot::{self, FAMILY};
use peft_kernels::Result;
use peft_kernels::qr_adaptor::memory::MemoryModel;
use peft_kernels::qr_adaptor::search::SearchResult;
use peft_kernels::qr_adaptor::{Candidate, SearchSpace};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const MIB: f64 = 1024.0 * 1024.0;

/// The points of the chart, in MiB and score.
struct Points {
    all: Vec<(f64, f64)>,
    front: Vec<(f64, f64)>,
    refs: Vec<(f64, f64, String)>,
    chosen: (f64, f64),
    budget: f64,
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    p: &Points,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let xs = p.all.iter().map(|x| x.0).chain([p.budget]);
    let (x_lo, x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (y_lo, y_hi) = p
        .all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x.1), b.max(x.1))
        });
    let pad_x = ((x_hi - x_lo) * 0.05).max(0.01);
    let pad_y = ((y_hi - y_lo) * 0.1).max(0.005);
    let mut chart = ChartBuilder::on(&root)
        .caption("QR-Adaptor search: validation accuracy vs memory", (FAMILY, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((x_lo - pad_x)..(x_hi + pad_x), (y_lo - pad_y)..(y_hi + pad_y))?;
    chart
        .configure_mesh()
        .x_desc("memory (MiB: weights + adapters + gradients + optimizer state)")
        .y_desc("validation accuracy (low fidelity)")
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()?;
    let grey = RGBColor(150, 150, 150);
    let red = RGBColor(204, 0, 0);
    let blue = RGBColor(52, 101, 164);
    chart
        .draw_series(p.all.iter().map(|&(x, y)| Circle::new((x, y), 4, grey.filled())))?
        .label("evaluated")
        .legend(move |(x, y)| Circle::new((x, y), 4, grey.filled()));
    let mut front = p.front.clone();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart.draw_series(std::iter::once(PathElement::new(
        front.clone(),
        red.stroke_width(2),
    )))?;
    chart
        .draw_series(front.iter().map(|&(x, y)| Circle::new((x, y), 5, red.filled())))?
        .label("Pareto front (within budget)")
        .legend(move |(x, y)| Circle::new((x, y), 5, red.filled()));
    chart
        .draw_series(p.refs.iter().map(|(x, y, _)| {
            Rectangle::new(
                [
                    (*x - pad_x * 0.15, *y - pad_y * 0.08),
                    (*x + pad_x * 0.15, *y + pad_y * 0.08),
                ],
                blue.filled(),
            )
        }))?
        .label("uniform NF4-dq QLoRA")
        .legend(move |(x, y)| Rectangle::new([(x - 5, y - 5), (x + 5, y + 5)], blue.filled()));
    chart.draw_series(
        p.refs
            .iter()
            .map(|(x, y, t)| Text::new(t.clone(), (*x, *y + pad_y * 0.2), (FAMILY, 14))),
    )?;
    chart
        .draw_series(std::iter::once(TriangleMarker::new(
            p.chosen,
            10,
            RGBColor(0, 130, 0).filled(),
        )))?
        .label("chosen")
        .legend(|(x, y)| TriangleMarker::new((x, y), 8, RGBColor(0, 130, 0).filled()));
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(p.budget, y_lo - pad_y), (p.budget, y_hi + pad_y)],
            BLACK.stroke_width(1),
        )))?
        .label("budget")
        .legend(|(x, y)| PathElement::new(vec![(x - 8, y), (x + 8, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FAMILY, 15))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()
}

/// Writes `dir/pareto.svg` and `dir/pareto.png`.
pub fn write(
    dir: &Path,
    space: &SearchSpace,
    mm: &MemoryModel,
    res: &SearchResult,
    references: &[Candidate],
    budget: usize,
) -> Result<()> {
    let mib = |b: usize| b as f64 / MIB;
    let pts = Points {
        all: res.evaluated.iter().map(|e| (mib(e.memory), e.low)).collect(),
        front: res
            .front
            .iter()
            .map(|&i| (mib(res.evaluated[i].memory), res.evaluated[i].low))
            .collect(),
        refs: references
            .iter()
            .filter_map(|c| {
                let e = res.evaluated.iter().find(|e| &e.candidate == c)?;
                let r = space.rank(c.0[0]);
                Some((mib(mm.total(space, c)), e.low, format!("r={r}")))
            })
            .collect(),
        chosen: (mib(res.best.memory), res.best.low),
        budget: mib(budget),
    };
    let svg = plot::render_svg(|root| draw(root, &pts))?;
    peft_kernels::io::atomic_write(dir.join("pareto.svg"), svg.as_bytes())?;
    let png = plot::render_png(|root| draw(root, &pts))?;
    peft_kernels::io::atomic_write(dir.join("pareto.png"), &png)
}
