//! ROC curve as a PNG: TAR against FAR on a log axis.
//!
//! Text is drawn with a small built-in 5x7 pixel font instead of plotters'
//! text API: that needs system fonts (fontconfig + a TrueType file) at run
//! time, which a slim container or a fresh CI machine may not have, and
//! plotters panics rather than failing when it cannot draw text.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::metrics::{Eer, RocPoint, TarAtFar};

pub const WIDTH: u32 = 800;
pub const HEIGHT: u32 = 600;
const LEFT: i32 = 80;
const RIGHT: i32 = 30;
const TOP: i32 = 80;
const BOTTOM: i32 = 70;
/// Pixel-font scale: each font pixel is a SCALE x SCALE square.
const SCALE: i32 = 2;

pub const CURVE: RGBColor = RGBColor(31, 90, 200);
const GRID: RGBColor = RGBColor(225, 225, 225);
const AXIS: RGBColor = RGBColor(60, 60, 60);
const MARK: RGBColor = RGBColor(200, 50, 40);
const CHANCE: RGBColor = RGBColor(170, 170, 170);

pub struct RocPlot<'a> {
    pub roc: &'a [RocPoint],
    pub auc: f64,
    pub eer: Option<Eer>,
    pub operating_points: &'a [TarAtFar],
    /// One line under the title (model, flip, pairs).
    pub subtitle: String,
}

/// Maps (FAR, TAR) to pixels: log10 FAR from `10^lo_decade` to 1, TAR 0..1.
#[derive(Debug, Clone, Copy)]
pub struct Axes {
    pub lo_decade: i32,
}

impl Axes {
    /// The lowest decade shows the smallest non-zero FAR, and at least 1e-3
    /// so both reported operating points are on the plot.
    pub fn for_curve(roc: &[RocPoint]) -> Axes {
        let min_far = roc
            .iter()
            .map(|p| p.far)
            .filter(|&f| f > 0.0)
            .fold(1.0f64, f64::min);
        // The epsilon keeps an exact power of ten (log10 = -2.9999...) in its own decade.
        let lo = ((min_far.log10() + 1e-9).floor() as i32).clamp(-7, -3);
        Axes { lo_decade: lo }
    }

    pub fn x(&self, far: f64) -> i32 {
        let lo = f64::from(self.lo_decade);
        // FAR 0 has no place on a log axis: it is drawn on the left edge.
        let l = if far > 0.0 { far.log10().max(lo) } else { lo };
        let w = f64::from(WIDTH as i32 - LEFT - RIGHT);
        LEFT + ((l - lo) / -lo * w).round() as i32
    }

    pub fn y(&self, tar: f64) -> i32 {
        let h = f64::from(HEIGHT as i32 - TOP - BOTTOM);
        HEIGHT as i32 - BOTTOM - (tar.clamp(0.0, 1.0) * h).round() as i32
    }
}

pub fn draw(plot: &RocPlot, path: &Path) -> anyhow::Result<()> {
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        render(plot, &root).map_err(|e| anyhow::anyhow!("drawing the ROC plot: {e}"))?;
        root.present()
            .map_err(|e| anyhow::anyhow!("drawing the ROC plot: {e}"))?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .context("ROC plot buffer has the wrong size")?;
    img.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing the ROC plot to {}", path.display()))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult<'a> =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>>;

fn render<'a>(plot: &RocPlot, root: &Area<'a>) -> DrawResult<'a> {
    let axes = Axes::for_curve(plot.roc);
    let (x0, x1) = (axes.x(10f64.powi(axes.lo_decade)), axes.x(1.0));
    let (y0, y1) = (axes.y(0.0), axes.y(1.0));

    // Grid and tick labels.
    for d in axes.lo_decade..=0 {
        let x = axes.x(10f64.powi(d));
        root.draw(&PathElement::new(vec![(x, y1), (x, y0)], GRID))?;
        let label = if d == 0 {
            "1".to_owned()
        } else {
            format!("1E{d}")
        };
        text(root, &label, x - text_width(&label) / 2, y0 + 10, AXIS)?;
        // Minor ticks at 2..9 x 10^d.
        if d < 0 {
            for m in 2..10 {
                let xm = axes.x(f64::from(m) * 10f64.powi(d));
                root.draw(&PathElement::new(vec![(xm, y0), (xm, y0 + 4)], AXIS))?;
            }
        }
    }
    for i in 0..=10 {
        let tar = f64::from(i) / 10.0;
        let y = axes.y(tar);
        root.draw(&PathElement::new(vec![(x0, y), (x1, y)], GRID))?;
        if i % 2 == 0 {
            let label = format!("{tar:.1}");
            text(root, &label, x0 - 10 - text_width(&label), y - 7, AXIS)?;
        }
    }
    root.draw(&Rectangle::new([(x0, y1), (x1, y0)], AXIS))?;
    let xlabel = "FALSE ACCEPT RATE (LOG)";
    text(
        root,
        xlabel,
        (x0 + x1) / 2 - text_width(xlabel) / 2,
        y0 + 36,
        AXIS,
    )?;
    text(root, "TRUE ACCEPT RATE", x0 - 60, y1 - 24, AXIS)?;

    // Chance line TAR = FAR, sampled because it is curved on a log axis.
    let chance: Vec<(i32, i32)> = (0..=100)
        .map(|i| {
            let l = f64::from(axes.lo_decade) * (1.0 - f64::from(i) / 100.0);
            let far = 10f64.powf(l);
            (axes.x(far), axes.y(far))
        })
        .collect();
    root.draw(&PathElement::new(chance, CHANCE))?;

    // The curve: two-pixel line.
    let pts: Vec<(i32, i32)> = plot
        .roc
        .iter()
        .map(|p| (axes.x(p.far), axes.y(p.tar)))
        .collect();
    root.draw(&PathElement::new(pts, CURVE.stroke_width(2)))?;

    // Operating points: circled on the curve, listed in the lower right,
    // which the curve of any better-than-chance model leaves empty.
    let mut legend = Vec::new();
    for op in plot.operating_points {
        let (x, y) = (axes.x(op.far), axes.y(op.tar));
        root.draw(&Circle::new((x, y), 5, MARK.stroke_width(2)))?;
        legend.push((
            format!(
                "TAR {:.1}% AT FAR {:.0E} (THRESHOLD {:.3})",
                op.tar * 100.0,
                op.target_far,
                op.threshold
            ),
            MARK,
        ));
    }
    if let Some(e) = plot.eer {
        legend.push((
            format!("EER {:.2}% (THRESHOLD {:.3})", e.eer * 100.0, e.threshold),
            AXIS,
        ));
    }
    if !legend.is_empty() {
        let w = legend.iter().map(|(t, _)| text_width(t)).max().unwrap_or(0) + 20;
        let h = legend.len() as i32 * 20 + 12;
        // Lower right, unless the curve runs through it (a weak model): then
        // whichever of it and the upper left covers fewer curve points.
        let corners = [(x1 - 10 - w, y0 - 10 - h), (x0 + 10, y1 + 10)];
        let covered = |(cx, cy): (i32, i32)| {
            plot.roc
                .iter()
                .map(|p| (axes.x(p.far), axes.y(p.tar)))
                .filter(|&(x, y)| x >= cx && x <= cx + w && y >= cy && y <= cy + h)
                .count()
        };
        let (lx, ly) = *corners
            .iter()
            .min_by_key(|&&c| covered(c))
            .unwrap_or(&corners[0]);
        root.draw(&Rectangle::new(
            [(lx, ly), (lx + w, ly + h)],
            WHITE.filled(),
        ))?;
        root.draw(&Rectangle::new([(lx, ly), (lx + w, ly + h)], GRID))?;
        for (i, (line, color)) in legend.iter().enumerate() {
            text(root, line, lx + 10, ly + 10 + i as i32 * 20, *color)?;
        }
    }

    text(root, &format!("ROC  AUC {:.4}", plot.auc), LEFT, 10, AXIS)?;
    text(root, &plot.subtitle.to_uppercase(), LEFT, 30, AXIS)?;
    Ok(())
}

const GLYPH_W: i32 = 5;
const ADVANCE: i32 = (GLYPH_W + 1) * SCALE;

pub fn text_width(s: &str) -> i32 {
    s.chars().count() as i32 * ADVANCE
}

/// Draws `s` with its top-left corner at (x, y).
fn text<'a>(root: &Area<'a>, s: &str, x: i32, y: i32, color: RGBColor) -> DrawResult<'a> {
    for (i, c) in s.chars().enumerate() {
        let gx = x + i as i32 * ADVANCE;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                    let px = gx + col * SCALE;
                    let py = y + row as i32 * SCALE;
                    root.draw(&Rectangle::new(
                        [(px, py), (px + SCALE - 1, py + SCALE - 1)],
                        color.filled(),
                    ))?;
                }
            }
        }
    }
    Ok(())
}

/// 5x7 bitmaps, one byte per row, bit 4 = leftmost column.
pub fn glyph(c: char) -> [u8; 7] {
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
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
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
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '@' => [0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E],
        ' ' => [0; 7],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics::{roc_curve, tar_at_far, Scored};

    fn pixel(img: &image::RgbImage, x: i32, y: i32) -> [u8; 3] {
        img.get_pixel(x as u32, y as u32).0
    }

    #[test]
    fn axes_map_decades_and_rates() {
        let a = Axes { lo_decade: -4 };
        assert_eq!(a.x(1e-4), LEFT);
        assert_eq!(a.x(1.0), WIDTH as i32 - RIGHT);
        assert_eq!(a.x(0.0), LEFT);
        // Each decade is a quarter of the width (to the rounding pixel).
        let (d1, d2) = (a.x(1e-2) - a.x(1e-3), a.x(1e-1) - a.x(1e-2));
        assert!((d1 - d2).abs() <= 1 && (d1 * 4 - (WIDTH as i32 - LEFT - RIGHT)).abs() <= 4);
        assert_eq!(a.y(0.0), HEIGHT as i32 - BOTTOM);
        assert_eq!(a.y(1.0), TOP);
        let roc = [
            RocPoint {
                threshold: 0.0,
                far: 0.0,
                tar: 0.0,
            },
            RocPoint {
                threshold: 0.0,
                far: 2e-6,
                tar: 0.5,
            },
        ];
        assert_eq!(Axes::for_curve(&roc).lo_decade, -6);
        assert_eq!(Axes::for_curve(&roc[..1]).lo_decade, -3);
    }

    #[test]
    fn draws_the_curve_where_the_axes_put_it() {
        // 1000 mismatched pairs spread evenly over [0, 1) and 1000 matched
        // pairs at a fixed score: at FAR 0.1 (threshold 0.9) TAR is 0 below
        // score 0.9, so the curve runs along the bottom there, and it jumps to
        // TAR 1 at FAR 0.5 (matched pairs all at 0.5).
        let mut pairs: Vec<Scored> = (0..1000)
            .map(|i| Scored {
                score: f64::from(i) / 1000.0,
                same: false,
            })
            .collect();
        pairs.extend((0..1000).map(|_| Scored {
            score: 0.5005,
            same: true,
        }));
        let roc = roc_curve(&pairs).unwrap();
        let ops = [tar_at_far(&roc, 1e-2, 1000).unwrap()];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roc.png");
        draw(
            &RocPlot {
                roc: &roc,
                auc: 0.5,
                eer: None,
                operating_points: &ops,
                subtitle: "test".into(),
            },
            &path,
        )
        .unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let a = Axes::for_curve(&roc);
        assert_eq!(a.lo_decade, -3);
        // On the curve: TAR 0 at FAR 0.1, TAR 1 at FAR 0.8.
        assert_eq!(pixel(&img, a.x(0.1), a.y(0.0)), [CURVE.0, CURVE.1, CURVE.2]);
        assert_eq!(pixel(&img, a.x(0.8), a.y(1.0)), [CURVE.0, CURVE.1, CURVE.2]);
        // Off the curve: TAR 0.5 at FAR 0.1 is empty plot area (not curve).
        assert_ne!(
            pixel(&img, a.x(0.1), a.y(0.55)),
            [CURVE.0, CURVE.1, CURVE.2]
        );
    }

    #[test]
    fn every_printable_label_character_has_a_glyph() {
        let unknown = glyph('~');
        for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:-+=%()/_@".chars() {
            assert_ne!(glyph(c), unknown, "{c}");
        }
        assert_eq!(glyph('a'), glyph('A'));
    }
}
