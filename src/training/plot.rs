//! A loss-curve plot as PNG, drawn into a pixel buffer and encoded by hand (zlib + CRC), so training
//! needs no plotting or font library: train loss in blue, eval loss in orange, light grid lines at
//! each tenth of the step and loss ranges.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

const W: usize = 800;
const H: usize = 480;
const MARGIN: usize = 40;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![[255, 255, 255]; W * H],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: i64) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=steps {
            let x = x0 + (x1 - x0) * i / steps;
            let y = y0 + (y1 - y0) * i / steps;
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }

    fn png(&self) -> Result<Vec<u8>> {
        let mut raw = Vec::with_capacity(H * (1 + 3 * W));
        for y in 0..H {
            raw.push(0); // no filter
            for x in 0..W {
                raw.extend_from_slice(&self.px[y * W + x]);
            }
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw)
            .map_err(|e| Error::io("loss plot: compressing", e))?;
        let data = z
            .finish()
            .map_err(|e| Error::io("loss plot: compressing", e))?;
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], body: &[u8]| {
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(kind);
            crc.update(body);
            out.extend_from_slice(kind);
            out.extend_from_slice(body);
            out.extend_from_slice(&crc.finalize().to_be_bytes());
        };
        let mut ihdr = vec![];
        ihdr.extend_from_slice(&(W as u32).to_be_bytes());
        ihdr.extend_from_slice(&(H as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &data);
        chunk(b"IEND", &[]);
        Ok(out)
    }
}

/// Plot `train` and `eval` (step, loss) series to `path`.
pub fn loss_plot(train: &[(u64, f64)], eval: &[(u64, f64)], path: &Path) -> Result<()> {
    let mut c = Canvas::new();
    let all = train.iter().chain(eval).filter(|(_, l)| l.is_finite());
    let (mut max_step, mut lo, mut hi) = (1u64, f64::INFINITY, f64::NEG_INFINITY);
    for (s, l) in all {
        max_step = max_step.max(*s);
        lo = lo.min(*l);
        hi = hi.max(*l);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let (pw, ph) = ((W - 2 * MARGIN) as f64, (H - 2 * MARGIN) as f64);
    let at = |s: u64, l: f64| -> (i64, i64) {
        let x = MARGIN as f64 + pw * s as f64 / max_step as f64;
        let y = MARGIN as f64 + ph * (1.0 - (l - lo) / (hi - lo));
        (x as i64, y as i64)
    };
    for i in 0..=10 {
        let gx = (MARGIN as f64 + pw * i as f64 / 10.0) as i64;
        let gy = (MARGIN as f64 + ph * i as f64 / 10.0) as i64;
        c.line(
            (gx, MARGIN as i64),
            (gx, (H - MARGIN) as i64),
            [230, 230, 230],
            1,
        );
        c.line(
            (MARGIN as i64, gy),
            ((W - MARGIN) as i64, gy),
            [230, 230, 230],
            1,
        );
    }
    c.line(
        (MARGIN as i64, (H - MARGIN) as i64),
        ((W - MARGIN) as i64, (H - MARGIN) as i64),
        [0, 0, 0],
        2,
    );
    c.line(
        (MARGIN as i64, MARGIN as i64),
        (MARGIN as i64, (H - MARGIN) as i64),
        [0, 0, 0],
        2,
    );
    for (series, color) in [(train, [31u8, 119, 180]), (eval, [255u8, 127, 14])] {
        let pts: Vec<(i64, i64)> = series
            .iter()
            .filter(|(_, l)| l.is_finite())
            .map(|(s, l)| at(*s, *l))
            .collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], color, 2);
        }
        for p in &pts {
            c.line((p.0 - 2, p.1 - 2), (p.0 - 2, p.1 - 2), color, 4);
        }
    }
    // Legend swatches: train (blue), eval (orange).
    c.line(
        ((W - 120) as i64, 15),
        ((W - 95) as i64, 15),
        [31, 119, 180],
        4,
    );
    c.line(
        ((W - 60) as i64, 15),
        ((W - 35) as i64, 15),
        [255, 127, 14],
        4,
    );
    let bytes = c.png()?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_valid_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        loss_plot(&[(1, 3.0), (2, 2.0), (3, 1.5)], &[(2, 2.5)], &p).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&b[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), 800);
        assert!(b.ends_with(&[0xAE, 0x42, 0x60, 0x82])); // IEND CRC
    }
}
