//! PNG charts drawn by hand: a heatmap (retrieval score by length x depth) and a line chart
//! (perplexity by length, several settings). An RGB canvas, a 5x7 bitmap font, and a minimal
//! PNG encoder (zlib + CRC) — no imaging dependency.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

pub type Rgb = [u8; 3];

const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [200, 200, 200];
const PALETTE: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];

/// An RGB image.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Self {
        Canvas { width, height, pixels: vec![255; width * height * 3] }
    }

    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// A line `thick` pixels wide (Bresenham, stamped with a square).
    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, thick: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x - thick / 2, y - thick / 2, thick, thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y), glyphs scaled by `scale`.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + i as i64 * 6 * scale;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.rect(gx + col * scale, y + r as i64 * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    /// Text centred on x.
    pub fn text_centred(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        self.text(x - text_width(s, scale) / 2, y, s, scale, c);
    }

    pub fn save_png(&self, path: &Path) -> Result<()> {
        let bytes = encode_png(self.width as u32, self.height as u32, &self.pixels)?;
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
    }
}

pub fn text_width(s: &str, scale: i64) -> i64 {
    (s.chars().count() as i64 * 6 - 1).max(0) * scale
}

/// An 8-bit RGB PNG (filter 0 on every row, zlib-compressed).
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>> {
    assert_eq!(rgb.len(), width as usize * height as usize * 3);
    let row = width as usize * 3;
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for y in 0..height as usize {
        raw.push(0);
        raw.extend_from_slice(&rgb[y * row..(y + 1) * row]);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw)?;
    let idat = z.finish()?;
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(kind);
        h.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&h.finalize().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter method, no interlace
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &idat);
    chunk(b"IEND", &[]);
    Ok(out)
}

/// Score colour: red (0) -> yellow (50) -> green (100).
pub fn score_colour(v: f64) -> Rgb {
    let t = (v / 100.0).clamp(0.0, 1.0);
    let (r, g) = if t < 0.5 { (1.0, t * 2.0) } else { (2.0 - t * 2.0, 1.0) };
    [(r * 220.0 + 20.0) as u8, (g * 190.0 + 30.0) as u8, 60]
}

/// Heatmap of `values[i][j]` (0..=100): columns = `cols` (e.g. lengths), rows = `rows`
/// (e.g. depths), each cell labelled with its value.
pub fn heatmap(
    title: &str,
    x_label: &str,
    y_label: &str,
    cols: &[String],
    rows: &[String],
    values: &[Vec<f64>],
) -> Canvas {
    let (cell_w, cell_h) = (90i64, 36i64);
    let (left, top) = (110i64, 70i64);
    let w = left + cell_w * cols.len() as i64 + 30;
    let h = top + cell_h * rows.len() as i64 + 70;
    let mut c = Canvas::new(w.max(420).max(text_width(title, 2) + 20) as usize, h as usize);
    c.text(10, 12, title, 2, BLACK);
    for (i, col) in cols.iter().enumerate() {
        let x = left + cell_w * i as i64;
        c.text_centred(x + cell_w / 2, top - 18, col, 2, BLACK);
        for (j, _) in rows.iter().enumerate() {
            let y = top + cell_h * j as i64;
            let v = values[i][j];
            c.rect(x + 1, y + 1, cell_w - 2, cell_h - 2, score_colour(v));
            c.text_centred(x + cell_w / 2, y + cell_h / 2 - 7, &format!("{v:.0}"), 2, BLACK);
        }
    }
    for (j, row) in rows.iter().enumerate() {
        let y = top + cell_h * j as i64;
        c.text(left - 10 - text_width(row, 2), y + cell_h / 2 - 7, row, 2, BLACK);
    }
    c.text(10, top - 18, y_label, 2, BLACK);
    c.text_centred(left + cell_w * cols.len() as i64 / 2, top + cell_h * rows.len() as i64 + 14, x_label, 2, BLACK);
    c
}

/// A line chart: x on a log2 axis (lengths), y linear or log10 (when the data span more than
/// 20x), one coloured line per series with a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> Canvas {
    let (w, h) = (900i64, 560i64);
    let (left, right, top, bottom) = (110i64, 240i64, 60i64, 80i64);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let mut c = Canvas::new(w as usize, h as usize);
    c.text(10, 12, title, 2, BLACK);
    let pts: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.1.iter().copied()).filter(|p| p.0 > 0.0 && p.1.is_finite() && p.1 > 0.0).collect();
    if pts.is_empty() {
        c.text(left, top + ph / 2, "no data", 2, BLACK);
        return c;
    }
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0.log2()), a.1.max(p.0.log2())));
    let (ymin, ymax) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let log_y = ymax / ymin > 20.0;
    let ty = |v: f64| if log_y { v.log10() } else { v };
    let (mut y0, mut y1) = (ty(ymin), ty(ymax));
    if x1 - x0 < 1e-9 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let pad = ((y1 - y0) * 0.08).max(if log_y { 0.05 } else { (y1.abs() * 0.05).max(1e-3) });
    y0 -= pad;
    y1 += pad;
    if !log_y {
        y0 = y0.max(0.0);
    }
    let px = |x: f64| left + ((x.log2() - x0) / (x1 - x0) * (pw as f64 - 40.0)) as i64 + 20;
    let py = |y: f64| top + ph - ((ty(y) - y0) / (y1 - y0) * ph as f64) as i64;
    // Axes and grid.
    c.line(left, top, left, top + ph, 2, BLACK);
    c.line(left, top + ph, left + pw, top + ph, 2, BLACK);
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs.dedup();
    for &x in &xs {
        let gx = px(x);
        c.line(gx, top, gx, top + ph, 1, GREY);
        c.text_centred(gx, top + ph + 10, &fmt_len(x), 2, BLACK);
    }
    for k in 0..=5 {
        let v = y0 + (y1 - y0) * k as f64 / 5.0;
        let val = if log_y { 10f64.powf(v) } else { v };
        let gy = top + ph - (ph as f64 * k as f64 / 5.0) as i64;
        c.line(left, gy, left + pw, gy, 1, GREY);
        let label = fmt_num(val);
        c.text(left - 8 - text_width(&label, 2), gy - 7, &label, 2, BLACK);
    }
    c.line(left, top, left, top + ph, 2, BLACK);
    c.line(left, top + ph, left + pw, top + ph, 2, BLACK);
    c.text_centred(left + pw / 2, top + ph + 40, x_label, 2, BLACK);
    c.text(10, top - 24, y_label, 2, BLACK);
    for (i, (name, ps)) in series.iter().enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        let ps: Vec<(f64, f64)> = ps.iter().copied().filter(|p| p.0 > 0.0 && p.1.is_finite() && p.1 > 0.0).collect();
        for wnd in ps.windows(2) {
            c.line(px(wnd[0].0), py(wnd[0].1), px(wnd[1].0), py(wnd[1].1), 3, col);
        }
        for p in &ps {
            c.rect(px(p.0) - 4, py(p.1) - 4, 9, 9, col);
        }
        let ly = top + 10 + i as i64 * 26;
        c.rect(left + pw + 16, ly, 18, 14, col);
        let short: String = name.chars().take(16).collect();
        c.text(left + pw + 40, ly, &short, 2, BLACK);
    }
    c
}

fn fmt_len(x: f64) -> String {
    let x = x.round() as i64;
    if x >= 1024 && x % 1024 == 0 {
        format!("{}K", x / 1024)
    } else {
        x.to_string()
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

/// 5x7 glyphs (bit 4 = leftmost column); lowercase letters use the capitals, unknown
/// characters a box.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        ' ' => [0; 7],
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
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '\'' => [0x04, 0x04, 0x08, 0, 0, 0, 0],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_has_valid_chunks() {
        let mut c = Canvas::new(7, 3);
        c.set(1, 1, [1, 2, 3]);
        let png = encode_png(7, 3, &c.pixels).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // Walk the chunks, checking each CRC; then inflate IDAT back to the scanlines.
        let mut i = 8;
        let mut idat = Vec::new();
        let mut kinds = Vec::new();
        while i < png.len() {
            let len = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
            let kind = &png[i + 4..i + 8];
            let data = &png[i + 8..i + 8 + len];
            let crc = u32::from_be_bytes(png[i + 8 + len..i + 12 + len].try_into().unwrap());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            assert_eq!(h.finalize(), crc);
            if kind == b"IDAT" {
                idat.extend_from_slice(data);
            }
            kinds.push(String::from_utf8_lossy(kind).into_owned());
            i += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&idat[..]), &mut raw).unwrap();
        assert_eq!(raw.len(), 3 * (1 + 7 * 3));
        assert_eq!(&raw[22 + 1 + 3..22 + 1 + 6], &[1, 2, 3]);
    }

    #[test]
    fn charts_draw_something() {
        let h = heatmap("t", "len", "depth", &["512".into(), "1K".into()], &["0%".into()], &[vec![100.0], vec![0.0]]);
        let green = (0..h.height).any(|y| (0..h.width).any(|x| h.get(x, y) == score_colour(100.0)));
        assert!(green);
        let l = line_chart("ppl", "len", "ppl", &[("a".into(), vec![(512.0, 10.0), (1024.0, 12.0)])]);
        let blue = (0..l.height).any(|y| (0..l.width).any(|x| l.get(x, y) == PALETTE[0]));
        assert!(blue);
    }
}
