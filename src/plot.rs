//! Training curves from a checkpoint's `metrics.jsonl`: reconstruction, KL, beta and the
//! validation ELBO against the training step, drawn as one PNG with plotters. The four panels are
//! the ones to read for posterior collapse (Bowman et al. 2016, Fig. 2): KL falling to zero while
//! beta rises is the failure, a reconstruction that keeps falling with KL held is the success.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

/// One line of `metrics.jsonl`. Fields the plot does not draw are ignored, so older and newer
/// files read alike.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Record {
    Train {
        step: u64,
        rec: f64,
        kl: f64,
        beta: f64,
    },
    Epoch {
        step: u64,
        valid_rec: f64,
        valid_kl: f64,
        valid_elbo: f64,
    },
}

/// The series of a run, each as (step, value).
#[derive(Debug, Default, PartialEq)]
pub struct Curves {
    pub train_rec: Vec<(f64, f64)>,
    pub train_kl: Vec<(f64, f64)>,
    pub beta: Vec<(f64, f64)>,
    pub valid_rec: Vec<(f64, f64)>,
    pub valid_kl: Vec<(f64, f64)>,
    pub valid_elbo: Vec<(f64, f64)>,
}

impl Curves {
    /// Parses the lines of a metrics file; `source` names it in errors.
    pub fn parse(reader: impl BufRead, source: &str) -> Result<Self> {
        let mut c = Curves::default();
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading {source}"))?;
            if line.trim().is_empty() {
                continue;
            }
            let record: Record = serde_json::from_str(&line)
                .with_context(|| format!("{source}, line {}: not a metrics record", i + 1))?;
            match record {
                Record::Train {
                    step,
                    rec,
                    kl,
                    beta,
                } => {
                    let s = step as f64;
                    c.train_rec.push((s, rec));
                    c.train_kl.push((s, kl));
                    c.beta.push((s, beta));
                }
                Record::Epoch {
                    step,
                    valid_rec,
                    valid_kl,
                    valid_elbo,
                } => {
                    let s = step as f64;
                    c.valid_rec.push((s, valid_rec));
                    c.valid_kl.push((s, valid_kl));
                    c.valid_elbo.push((s, valid_elbo));
                }
            }
        }
        if c.train_rec.is_empty() && c.valid_elbo.is_empty() {
            bail!("{source} holds no training records yet: nothing to plot");
        }
        Ok(c)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Self::parse(BufReader::new(file), &path.display().to_string())
    }
}

/// The y-range that shows a series' course: the first logging windows of a run average a KL in
/// the thousands (an untrained encoder), which would flatten everything after them, so the top is
/// cut at three times the 90th percentile when the maximum lies beyond it.
pub fn y_range(series: &[&[(f64, f64)]]) -> (f64, f64) {
    let mut ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.iter().map(|&(_, y)| y))
        .filter(|y| y.is_finite())
        .collect();
    if ys.is_empty() {
        return (0.0, 1.0);
    }
    ys.sort_by(f64::total_cmp);
    let lo = ys[0];
    let hi = ys[ys.len() - 1];
    let p90 = ys[(ys.len() - 1) * 9 / 10];
    let hi = if hi - lo > 3.0 * (p90 - lo) && p90 > lo {
        lo + 3.0 * (p90 - lo)
    } else {
        hi
    };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

fn x_range(c: &Curves) -> (f64, f64) {
    let max = [&c.train_rec, &c.valid_elbo]
        .iter()
        .flat_map(|s| s.iter().map(|&(x, _)| x))
        .fold(1.0f64, f64::max);
    (0.0, max)
}

/// plotters' ab_glyph backend finds no system fonts: the DejaVu Sans bytes from the `dejavu`
/// crate are registered once, so a plot looks the same on every machine.
fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("the bundled DejaVu Sans font could not be loaded")
    }
}

type Series<'a> = (&'a str, &'a [(f64, f64)], RGBColor);

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    x: (f64, f64),
    series: &[Series],
) -> Result<()> {
    let (y0, y1) = y_range(&series.iter().map(|s| s.1).collect::<Vec<_>>());
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x.0..x.1, y0..y1)
        .map_err(|e| anyhow!("drawing the {title} panel: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("drawing the {title} axes: {e}"))?;
    for &(name, points, color) in series {
        if points.is_empty() {
            continue;
        }
        // Points above the visible range are clipped to its top rather than dropped, so the
        // line still shows where the run started.
        // A diverged run logs NaN: those points are left out, not drawn at an arbitrary height.
        let clipped = points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(px, py)| (px, py.min(y1)));
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(clipped, style))
            .map_err(|e| anyhow!("drawing {name}: {e}"))?
            .label(name)
            .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 18, ly)], style));
        if points.len() <= 60 {
            chart
                .draw_series(
                    points
                        .iter()
                        .filter(|p| p.1.is_finite())
                        .map(|&(px, py)| Circle::new((px, py.min(y1)), 3, color.filled())),
                )
                .map_err(|e| anyhow!("drawing {name}: {e}"))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("drawing the {title} legend: {e}"))?;
    Ok(())
}

/// Draws the four panels into a PNG of `size` pixels at `out`, replacing it whole or not at
/// all (an existing plot survives a failed redraw).
pub fn draw(c: &Curves, out: &Path, title: &str, size: (u32, u32)) -> Result<()> {
    crate::files::write_atomic_with(out, |tmp| draw_at(c, tmp, title, size))
}

/// [`draw`] straight into `out` (a temporary path: the PNG is encoded at `present`).
fn draw_at(c: &Curves, out: &Path, title: &str, size: (u32, u32)) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, size).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow!("drawing {}: {e}", out.display()))?;
    let root = root
        .titled(title, ("sans-serif", 26))
        .map_err(|e| anyhow!("drawing {}: {e}", out.display()))?;
    let panels = root.split_evenly((2, 2));
    let x = x_range(c);
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let green = RGBColor(44, 160, 44);
    panel(
        &panels[0],
        "reconstruction (nats/sentence)",
        x,
        &[
            ("train", &c.train_rec, blue),
            ("valid", &c.valid_rec, orange),
        ],
    )?;
    panel(
        &panels[1],
        "KL (nats/sentence)",
        x,
        &[("train", &c.train_kl, blue), ("valid", &c.valid_kl, orange)],
    )?;
    panel(&panels[2], "beta", x, &[("beta", &c.beta, green)])?;
    panel(
        &panels[3],
        "validation ELBO (nats/sentence)",
        x,
        &[("valid", &c.valid_elbo, orange)],
    )?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"kind":"train","step":50,"epoch":1,"loss":9.0,"rec":8.0,"kl":900.0,"beta":0.1,"lr":0.001,"tokens_per_sec":1.0}
{"kind":"train","step":100,"epoch":1,"loss":7.0,"rec":6.0,"kl":5.0,"beta":0.2,"lr":0.001,"tokens_per_sec":1.0}

{"kind":"epoch","epoch":1,"step":120,"lr":0.001,"partial":false,"valid_rec":6.5,"valid_kl":4.0,"valid_elbo":10.5,"valid_au":3,"elapsed_secs":2.0}
"#;

    #[test]
    fn parses_train_and_epoch_records() {
        let c = Curves::parse(LINES.as_bytes(), "m").unwrap();
        assert_eq!(c.train_rec, vec![(50.0, 8.0), (100.0, 6.0)]);
        assert_eq!(c.train_kl, vec![(50.0, 900.0), (100.0, 5.0)]);
        assert_eq!(c.beta, vec![(50.0, 0.1), (100.0, 0.2)]);
        assert_eq!(c.valid_elbo, vec![(120.0, 10.5)]);
        assert_eq!(c.valid_kl, vec![(120.0, 4.0)]);
    }

    #[test]
    fn bad_line_is_named() {
        let text = format!("{LINES}{{\"kind\":\"train\",\"step\":1}}\n");
        let err = format!(
            "{:#}",
            Curves::parse(text.as_bytes(), "m.jsonl").unwrap_err()
        );
        assert!(err.contains("m.jsonl, line 5"), "{err}");
        let empty = format!("{:#}", Curves::parse("\n".as_bytes(), "m").unwrap_err());
        assert!(empty.contains("no training records"), "{empty}");
    }

    #[test]
    fn y_range_cuts_the_early_outlier_only() {
        let steady: Vec<(f64, f64)> = (0..20).map(|i| (i as f64, 4.0 + i as f64 * 0.1)).collect();
        let (lo, hi) = y_range(&[&steady]);
        assert!(lo <= 4.0 && (5.9..6.1).contains(&hi), "{lo} {hi}");
        let mut spiked = steady.clone();
        spiked[0].1 = 7000.0;
        let (lo, hi) = y_range(&[&spiked]);
        assert!(lo <= 4.1 && hi < 20.0, "{lo} {hi}");
        assert_eq!(y_range(&[]), (0.0, 1.0));
        let flat = [(0.0, 2.0), (1.0, 2.0)];
        let (lo, hi) = y_range(&[&flat]);
        assert!(lo < 2.0 && hi > 2.0);
    }
}
