//! Contact sheets: a grid of edits with row and column labels (and an optional title), so that a
//! parameter sweep (guidance x start, UniTune's per-image search) can be judged at a glance.
//! Labels are drawn with the built-in bitmap font ([`super::font`]).

use image::{Rgb, RgbImage};

use super::font::{draw_text, text_width, ADVANCE, GLYPH_H};
use crate::{Error, Result};

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_io::font::INK;

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
