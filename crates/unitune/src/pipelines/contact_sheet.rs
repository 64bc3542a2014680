//! Contact sheets: a grid of edits with row and column labels (and an optional title), so that a
//! parameter sweep (guidance x start, UniTune's per-image search) can be judged at a glance.
//!
//! Labels are drawn with a built-in 5x7 bitmap font (digits, capital letters, common punctuation;
//! lower case is drawn in capitals), scaled up for large cells, so no font file is needed.

use image::{Rgb, RgbImage};

use crate::{Error, Result};

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([0, 0, 0]);
/// Glyph cell: 5 columns of pixels plus 1 of spacing, 7 rows.
const GLYPH_W: u32 = 5;
const GLYPH_H: u32 = 7;
const ADVANCE: u32 = GLYPH_W + 1;

/// Lays `cells` (row-major, all the same size) out in `row_labels.len()` rows and
/// `column_labels.len()` columns, labels above the columns and left of the rows, `title` (cut to
/// the sheet's width) on top.
pub fn contact_sheet(
    cells: &[RgbImage],
    row_labels: &[String],
    column_labels: &[String],
    title: Option<&str>,
) -> Result<RgbImage> {
    let (rows, columns) = (row_labels.len(), column_labels.len());
    if rows == 0 || columns == 0 || cells.len() != rows * columns {
        return Err(Error::argument(
            "contact sheet",
            format!("{} images for {rows} rows x {columns} columns", cells.len()),
        ));
    }
    let (cell_w, cell_h) = cells[0].dimensions();
    if let Some(odd) = cells.iter().find(|c| c.dimensions() != (cell_w, cell_h)) {
        return Err(Error::argument(
            "contact sheet",
            format!(
                "images differ in size: {:?} and {:?}",
                (cell_w, cell_h),
                odd.dimensions()
            ),
        ));
    }
    // Text about a tenth of a 512-pixel cell's width per 10 characters; at least 1x.
    let scale = (cell_w / 256).max(1);
    let gap = 2 * scale;
    let line_h = (GLYPH_H + 4) * scale;
    let label_w = row_labels
        .iter()
        .map(|l| text_width(l, scale))
        .max()
        .unwrap_or(0)
        + 2 * gap;
    let header_h = line_h + title.map_or(0, |_| line_h);
    let width = label_w + columns as u32 * (cell_w + gap);
    let height = header_h + rows as u32 * (cell_h + gap);
    let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);

    if let Some(title) = title {
        let fits = ((width - gap) / (ADVANCE * scale)) as usize;
        draw_text(
            &mut sheet,
            &title.chars().take(fits).collect::<String>(),
            gap,
            2 * scale,
            scale,
        );
    }
    for (c, label) in column_labels.iter().enumerate() {
        let x = label_w + c as u32 * (cell_w + gap);
        draw_text(&mut sheet, label, x, header_h - line_h + 2 * scale, scale);
    }
    for (r, label) in row_labels.iter().enumerate() {
        let y = header_h + r as u32 * (cell_h + gap);
        draw_text(
            &mut sheet,
            label,
            gap,
            y + (cell_h.saturating_sub(GLYPH_H * scale)) / 2,
            scale,
        );
        for c in 0..columns {
            let x = label_w + c as u32 * (cell_w + gap);
            image::imageops::replace(&mut sheet, &cells[r * columns + c], x as i64, y as i64);
        }
    }
    Ok(sheet)
}

/// Pixels `text` takes along a line at `scale`.
fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * ADVANCE * scale
}

/// Draws `text` with its top left corner at `(x, y)`, clipped to the image.
fn draw_text(image: &mut RgbImage, text: &str, x: u32, y: u32, scale: u32) {
    for (i, ch) in text.chars().enumerate() {
        let left = x + i as u32 * ADVANCE * scale;
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits >> (GLYPH_W - 1 - col) & 1 == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (left + col * scale + dx, y + row as u32 * scale + dy);
                        if px < image.width() && py < image.height() {
                            image.put_pixel(px, py, INK);
                        }
                    }
                }
            }
        }
    }
}

/// The 5x7 bitmap of `ch`: one byte per row, top first, bit 4 the leftmost pixel. Lower case
/// maps to capitals; characters without a glyph are drawn as `?`.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        ' ' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
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
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        ';' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '\'' => [0x0C, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00],
        '"' => [0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00],
        '!' => [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '#' => [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A],
        '*' => [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00],
        '&' => [0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04], // '?'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The printable characters the font draws (lower case aside).
    const DRAWN: &str = " 0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;-+=_/()[]<>'\"!%#*&?";

    #[test]
    fn every_glyph_is_distinct_and_fits_five_columns() {
        let glyphs: Vec<[u8; 7]> = DRAWN.chars().map(glyph).collect();
        for (i, a) in glyphs.iter().enumerate() {
            assert!(
                a.iter().all(|row| row >> GLYPH_W == 0),
                "{:?} is wider than 5",
                DRAWN.chars().nth(i)
            );
            for (j, b) in glyphs.iter().enumerate().skip(i + 1) {
                assert_ne!(
                    a,
                    b,
                    "{:?} and {:?} look alike",
                    DRAWN.chars().nth(i),
                    DRAWN.chars().nth(j)
                );
            }
        }
        assert_eq!(glyph('g'), glyph('G'));
        assert_eq!(glyph('~'), glyph('?'));
    }

    #[test]
    fn draws_glyphs_pixel_for_pixel() {
        let mut image = RgbImage::from_pixel(12, 7, BACKGROUND);
        draw_text(&mut image, "1=", 0, 0, 1);
        // '1' row 1 is .##.. and '=' (starting at x = 6) row 2 is #####.
        let ink: Vec<bool> = (0..5).map(|x| image.get_pixel(x, 1) == &INK).collect();
        assert_eq!(ink, [false, true, true, false, false]);
        assert!((6..11).all(|x| image.get_pixel(x, 2) == &INK));
        assert!((0..12).all(|x| image.get_pixel(x, 3) != &INK || (6..11).contains(&x) || x == 2));
    }

    #[test]
    fn lays_out_cells_with_labels() {
        let cell = |v: u8| RgbImage::from_pixel(16, 12, Rgb([v, 255 - v, 7]));
        let cells: Vec<RgbImage> = (0..6).map(|i| cell(i * 40)).collect();
        let rows: Vec<String> = ["t0=0.8", "t0=0.9"].map(String::from).to_vec();
        let columns: Vec<String> = ["g=4", "g=8", "g=16"].map(String::from).to_vec();
        let sheet = contact_sheet(&cells, &rows, &columns, Some("beikkpic a dog")).unwrap();
        // Scale 1, gap 2, line 11: labels 6 chars * 6 + 4 = 40 wide, header 22 high.
        assert_eq!(sheet.dimensions(), (40 + 3 * 18, 22 + 2 * 14));
        for (i, c) in cells.iter().enumerate() {
            let (x, y) = (40 + (i as u32 % 3) * 18, 22 + (i as u32 / 3) * 14);
            let view = image::imageops::crop_imm(&sheet, x, y, 16, 12).to_image();
            assert_eq!(&view, c, "cell {i}");
        }
        let inked = |x0: u32, y0: u32, w: u32, h: u32| {
            (y0..y0 + h)
                .flat_map(|y| (x0..x0 + w).map(move |x| (x, y)))
                .filter(|&(x, y)| sheet.get_pixel(x, y) == &INK)
                .count()
        };
        assert!(inked(0, 0, 94, 11) > 20, "title");
        assert!(inked(40, 11, 54, 11) > 20, "column labels");
        assert!(inked(0, 22, 40, 28) > 20, "row labels");
        assert!(contact_sheet(&cells[..5], &rows, &columns, None).is_err());
    }
}
