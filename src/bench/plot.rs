//! PNG plots of an [`Aggregate`]: speedup per category per method (grouped
//! bars) and MAT against the draft budget. Text needs a TrueType font: the
//! file in `$TREESPEC_FONT`, else a common system sans-serif; without one
//! the plots are skipped (the caller reports why), never drawn unlabelled.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::aggregate::{Aggregate, OVERALL};
use super::dataset::category_short;
use super::record::{MethodSpec, BASELINE};
use crate::error::{Error, Result};

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1100, 620);

/// Fonts tried in order when `$TREESPEC_FONT` is unset.
const FONT_CANDIDATES: [&str; 7] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("plot: {e}")))
}

/// Registers a font with plotters once; the error says why none could be.
fn ensure_font() -> Result<()> {
    static FONT_STATE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let state = FONT_STATE.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("TREESPEC_FONT") {
            candidates.push(p.into());
        }
        candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                return Ok(path);
            }
        }
        Err("no TrueType font found (set TREESPEC_FONT to a .ttf file)".to_string())
    });
    state.clone().map(|_| ()).map_err(plot_err)
}

/// Distinct colours for up to 10 methods, then repeating.
fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 10] = [
        RGBColor(120, 120, 120),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    P[i % P.len()]
}

/// Draws into `<stem>.tmp.png` beside `path` (the backend picks the format
/// from the extension), then renames, so a reader never sees half a file.
fn atomically(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    ensure_font()?;
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Grouped bars: one group per category (then overall), one bar per method,
/// a line at 1.0× (plain decoding).
pub fn speedup_by_category(path: &Path, agg: &Aggregate) -> Result<()> {
    let mut groups: Vec<String> = agg.categories.clone();
    groups.push(OVERALL.into());
    let mut rows: Vec<String> = agg.methods.clone();
    if let Some(p) = agg.peer.first() {
        rows.push(p.method.clone());
    }
    let value = |m: &str, c: &str| agg.cell(m, c).and_then(|c| c.speedup);
    let ymax = rows
        .iter()
        .flat_map(|m| groups.iter().filter_map(move |c| value(m, c)))
        .fold(1.0f64, f64::max)
        * 1.15;
    atomically(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("Speedup over plain decoding by category", (FONT, 24))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..groups.len() as f64 - 0.5, 0f64..ymax)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("speedup (×)")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .draw()
            .map_err(plot_err)?;
        let width = 0.8 / rows.len().max(1) as f64;
        for (mi, m) in rows.iter().enumerate() {
            let c = color(mi);
            let bars: Vec<Rectangle<(f64, f64)>> = groups
                .iter()
                .enumerate()
                .filter_map(|(gi, g)| {
                    let v = value(m, g)?;
                    let x0 = gi as f64 - 0.4 + mi as f64 * width;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + width * 0.9, v)],
                        c.filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(plot_err)?
                .label(m.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], c.filled()));
        }
        chart
            .draw_series(LineSeries::new(
                [(-0.5, 1.0), (groups.len() as f64 - 0.5, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(plot_err)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 15))
            .draw()
            .map_err(plot_err)?;
        // Category names under the axis, centred on their group.
        let area = chart.plotting_area();
        for (gi, g) in groups.iter().enumerate() {
            let (px, py) = area.map_coordinate(&(gi as f64, 0.0));
            let title = category_short(g);
            let style = TextStyle::from((FONT, 14).into_font()).pos(
                plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                ),
            );
            root.draw(&Text::new(title, (px, py + 8), style))
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// MAT against the draft budget, one line per method family, when some
/// family was run at two or more budgets; else one bar of MAT per method.
pub fn mat_vs_budget(path: &Path, agg: &Aggregate, methods: &[MethodSpec]) -> Result<()> {
    let mat_of = |label: &str| agg.cell(label, OVERALL).and_then(|c| c.mat);
    let mut families: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
    for m in methods.iter().filter(|m| m.label != BASELINE) {
        let Some(mat) = mat_of(&m.label) else {
            continue;
        };
        let fam = m.family();
        match families.iter_mut().find(|(f, _)| *f == fam) {
            Some((_, pts)) => pts.push((m.max_draft, mat)),
            None => families.push((fam, vec![(m.max_draft, mat)])),
        }
    }
    for (_, pts) in families.iter_mut() {
        pts.sort_by_key(|p| p.0);
        pts.dedup_by_key(|p| p.0);
    }
    let sweep = families.iter().any(|(_, p)| p.len() >= 2);
    let ymax = families
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(1.0f64, f64::max)
        * 1.15;
    if sweep {
        let xmax = families
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.0))
            .max()
            .unwrap_or(1) as f64;
        atomically(path, |root| {
            let mut chart = ChartBuilder::on(root)
                .caption("Mean accepted tokens vs draft budget", (FONT, 24))
                .margin(12)
                .x_label_area_size(50)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..xmax * 1.05 + 1.0, 0f64..ymax)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("draft nodes per step")
                .y_desc("MAT (tokens/step)")
                .label_style((FONT, 15))
                .axis_desc_style((FONT, 16))
                .draw()
                .map_err(plot_err)?;
            for (i, (fam, pts)) in families.iter().enumerate() {
                let c = color(i + 1);
                let xy: Vec<(f64, f64)> = pts.iter().map(|&(b, m)| (b as f64, m)).collect();
                chart
                    .draw_series(LineSeries::new(xy.clone(), c.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(fam.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2))
                    });
                chart
                    .draw_series(xy.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                    .map_err(plot_err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT, 15))
                .draw()
                .map_err(plot_err)?;
            Ok(())
        })
    } else {
        let bars: Vec<(String, f64)> = methods
            .iter()
            .filter(|m| m.label != BASELINE)
            .filter_map(|m| Some((m.label.clone(), mat_of(&m.label)?)))
            .collect();
        atomically(path, |root| {
            let mut chart = ChartBuilder::on(root)
                .caption("Mean accepted tokens per step by method", (FONT, 24))
                .margin(12)
                .x_label_area_size(50)
                .y_label_area_size(60)
                .build_cartesian_2d(-0.5f64..bars.len().max(1) as f64 - 0.5, 0f64..ymax)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_desc("MAT (tokens/step)")
                .label_style((FONT, 15))
                .axis_desc_style((FONT, 16))
                .draw()
                .map_err(plot_err)?;
            chart
                .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                    let x = i as f64;
                    Rectangle::new([(x - 0.3, 0.0), (x + 0.3, *v)], color(i + 1).filled())
                }))
                .map_err(plot_err)?;
            let area = chart.plotting_area();
            for (i, (label, v)) in bars.iter().enumerate() {
                let (px, py) = area.map_coordinate(&(i as f64, 0.0));
                let style = TextStyle::from((FONT, 15).into_font()).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Top,
                    ),
                );
                root.draw(&Text::new(format!("{label} ({v:.2})"), (px, py + 8), style))
                    .map_err(plot_err)?;
            }
            Ok(())
        })
    }
}
