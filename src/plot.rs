//! Pictures a user would rather look at than read: grids of images (PNG) and a training run's
//! curves (losses, learning rates, evaluated top-1 against iterations; PNG drawn with plotters
//! and an embedded font, so no system fonts are needed). Written atomically.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;

/// Tiles planar (C, H, W) u8 RGB images into one PNG, `cols` per row, scaled up `zoom` times.
pub fn save_grid(
    path: &Path,
    images: &[&[u8]],
    h: usize,
    w: usize,
    cols: usize,
    zoom: u32,
) -> Result<()> {
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols);
    let mut img = image::RgbImage::new((cols * (w + 2)) as u32, (rows * (h + 2)) as u32);
    for (k, px) in images.iter().enumerate() {
        let (ox, oy) = ((k % cols) * (w + 2) + 1, (k / cols) * (h + 2) + 1);
        for y in 0..h {
            for x in 0..w {
                let p = image::Rgb([
                    px[y * w + x],
                    px[h * w + y * w + x],
                    px[2 * h * w + y * w + x],
                ]);
                img.put_pixel((ox + x) as u32, (oy + y) as u32, p);
            }
        }
    }
    let img = image::imageops::resize(
        &img,
        img.width() * zoom,
        img.height() * zoom,
        image::imageops::FilterType::Nearest,
    );
    write_png(path, img)
}

fn write_png(path: &Path, img: image::RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
    crate::io::write_atomic(path, &bytes)?;
    Ok(())
}

const FONT: &str = "datafree-sans";

/// One panel's series by name, each (iteration, value) points.
type Panel<'a> = BTreeMap<&'a str, Vec<(f64, f64)>>;

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and valid, so registration cannot fail.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        );
    });
}

/// One (panel, series, value) point of a curve at some iteration.
pub type CurvePoint = (&'static str, &'static str, f64);

/// One panel per curve group, stacked: each series against the iteration, y on a log scale
/// when every value is positive and they span more than a factor 20. `history` holds, per
/// logged iteration (counted from 1), its points.
pub fn curves(path: &Path, title: &str, history: &[(usize, Vec<CurvePoint>)]) -> Result<()> {
    let mut panels: BTreeMap<&str, Panel> = BTreeMap::new();
    for (iter, points) in history {
        for &(panel, series, v) in points {
            if v.is_finite() {
                panels
                    .entry(panel)
                    .or_default()
                    .entry(series)
                    .or_default()
                    .push((*iter as f64, v));
            }
        }
    }
    if panels.is_empty() {
        return Ok(());
    }
    register_font();
    let (w, ph) = (900u32, 260u32);
    let h = ph * panels.len() as u32 + 40;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
        let (top, body) = root.split_vertically(40);
        top.draw_text(
            &format!("{title}: {} logged iterations", history.len()),
            &(FONT, 20).into_font().color(&BLACK),
            (10, 10),
        )
        .map_err(e)?;
        let areas = body.split_evenly((panels.len(), 1));
        for (area, (panel, series)) in areas.iter().zip(&panels) {
            let pts = series.values().flatten();
            let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
            for &(x, y) in pts {
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
            let log = y0 > 0.0 && y1 / y0 > 20.0;
            let pad = if y1 > y0 {
                0.05 * (y1 - y0)
            } else {
                0.1 * y1.abs().max(1e-12)
            };
            let mut b = ChartBuilder::on(area);
            b.caption(*panel, (FONT, 16))
                .margin(8)
                .x_label_area_size(36)
                .y_label_area_size(60);
            if log {
                let c = b
                    .build_cartesian_2d(0f64..x1, (y0 * 0.9..y1 * 1.1).log_scale())
                    .map_err(e)?;
                draw_panel(c, series).map_err(|m| anyhow!("drawing {}: {m}", path.display()))?;
            } else {
                let c = b
                    .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))
                    .map_err(e)?;
                draw_panel(c, series).map_err(|m| anyhow!("drawing {}: {m}", path.display()))?;
            }
        }
        root.present().map_err(e)?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("curve buffer size"))?;
    write_png(path, img)
}

/// The mesh, one line per series and the legend of one panel.
fn draw_panel<'a, Y>(
    mut c: ChartContext<
        'a,
        BitMapBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    series: &Panel,
) -> std::result::Result<(), String>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let e = |e: DrawingAreaErrorKind<_>| format!("{e:?}");
    c.configure_mesh()
        .label_style((FONT, 12))
        .x_labels(8)
        .y_labels(6)
        .light_line_style(WHITE)
        .y_label_formatter(&|v| short(*v))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("iteration")
        .draw()
        .map_err(e)?;
    for (i, (name, p)) in series.iter().enumerate() {
        let style = Palette99::pick(i).stroke_width(2);
        c.draw_series(LineSeries::new(p.iter().copied(), style))
            .map_err(e)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], style));
    }
    c.configure_series_labels()
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)
}

/// A tick label: plain for ordinary magnitudes, scientific otherwise.
fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (1e-2..1e4).contains(&a) {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.2e}")
    }
}
