//! A1111's grids (`modules/images.py`): images side by side (`image_grid`), labels above
//! columns and left of rows (`draw_grid_annotations`), and an image cut into overlapping
//! tiles and put back together with the overlaps blended (`split_grid`, `combine_grid`).
//!
//! Labels are drawn with the public-domain 8×8 bitmap font of the `font8x8` crate, scaled
//! up to about A1111's font size, where A1111 uses a TrueType font: the layout (margins,
//! wrapping, centring) is A1111's, the letter shapes are not.

use image::{Rgb, RgbImage};

/// A1111's default grid background (`grid_background_color`).
pub const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
/// Text of an active label (`grid_text_active_color`).
pub const TEXT_ACTIVE: Rgb<u8> = Rgb([0, 0, 0]);
/// Text of an inactive label, struck through (`grid_text_inactive_color`).
pub const TEXT_INACTIVE: Rgb<u8> = Rgb([153, 153, 153]);

/// Puts images in `rows` rows, filled row by row: cells are as large as the largest image,
/// a smaller image is centred in its cell on the background.
pub fn image_grid(images: &[RgbImage], rows: usize) -> RgbImage {
    if images.is_empty() {
        return RgbImage::from_pixel(1, 1, BACKGROUND);
    }
    let rows = rows.clamp(1, images.len());
    let cols = images.len().div_ceil(rows);
    let w = images.iter().map(|i| i.width()).max().unwrap_or(1);
    let h = images.iter().map(|i| i.height()).max().unwrap_or(1);
    let mut grid = RgbImage::from_pixel(cols as u32 * w, rows as u32 * h, BACKGROUND);
    for (i, img) in images.iter().enumerate() {
        let x = (i % cols) as u32 * w + (w - img.width()) / 2;
        let y = (i / cols) as u32 * h + (h - img.height()) / 2;
        image::imageops::replace(&mut grid, img, x as i64, y as i64);
    }
    grid
}

/// One line of a label: its text, and whether it is drawn as active (black) or inactive
/// (grey, struck through: the prompt matrix's parts left out of a cell).
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// The text (wrapped at spaces to the room it has).
    pub text: String,
    /// Active or struck through.
    pub active: bool,
}

impl Annotation {
    /// An active label.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            active: true,
        }
    }
}

/// The 8×8 font scaled by `scale`.
#[derive(Debug, Clone, Copy)]
struct Font {
    scale: u32,
}

impl Font {
    /// About A1111's TrueType size `fontsize`: the bitmap's 8-pixel cell is wider than a
    /// proportional font's letters, so it is scaled to a quarter less.
    fn of_size(fontsize: u32) -> Self {
        Self {
            scale: (fontsize / 10).max(1),
        }
    }

    fn line_height(self) -> u32 {
        8 * self.scale
    }

    fn width(self, text: &str) -> u32 {
        text.chars().count() as u32 * 8 * self.scale
    }

    fn glyph(c: char) -> [u8; 8] {
        let i = c as usize;
        if i < 128 {
            font8x8::legacy::BASIC_LEGACY[i]
        } else if (0xA0..0x100).contains(&i) {
            font8x8::legacy::LATIN_LEGACY[i - 0xA0]
        } else {
            font8x8::legacy::BASIC_LEGACY[b'?' as usize]
        }
    }

    /// Draws `text` with its top-left corner at (x, y), clipped to the image.
    fn draw(self, img: &mut RgbImage, x: i64, y: i64, text: &str, color: Rgb<u8>) {
        let s = self.scale as i64;
        for (k, c) in text.chars().enumerate() {
            let rows = Self::glyph(c);
            let gx = x + k as i64 * 8 * s;
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) == 0 {
                        continue;
                    }
                    for dy in 0..s {
                        for dx in 0..s {
                            let (px, py) = (gx + col * s + dx, y + row as i64 * s + dy);
                            if px >= 0
                                && py >= 0
                                && (px as u32) < img.width()
                                && (py as u32) < img.height()
                            {
                                img.put_pixel(px as u32, py as u32, color);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Splits `text` at spaces into lines no wider than `room` (a word wider stays whole).
fn wrap(font: Font, text: &str, room: u32) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().expect("one line at least");
        let joined = if last.is_empty() {
            word.to_string()
        } else {
            format!("{last} {word}")
        };
        if font.width(&joined) <= room {
            *last = joined;
        } else {
            lines.push(word.to_string());
        }
    }
    lines
}

/// A label line laid out: its text, state and pixel size.
struct Line {
    text: String,
    active: bool,
    width: u32,
    height: u32,
    room: u32,
}

/// The margins A1111's `draw_grid_annotations` adds for cells of `width`×`height`: the
/// font size, the line spacing, the left pad (three quarters of a cell when any row has a
/// label) and the top pad (the tallest column label plus two line spacings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Margins {
    /// A1111's `fontsize`: (width + height) / 25.
    pub fontsize: u32,
    /// Half the font size.
    pub line_spacing: u32,
    /// Room left of the rows for their labels.
    pub pad_left: u32,
    /// Room above the columns for their labels.
    pub pad_top: u32,
}

fn lay_out(font: Font, labels: &[Vec<Annotation>], room: u32) -> Vec<Vec<Line>> {
    labels
        .iter()
        .map(|texts| {
            texts
                .iter()
                .flat_map(|a| {
                    wrap(font, &a.text, room).into_iter().map(|t| Line {
                        width: font.width(&t),
                        height: if t.is_empty() { 0 } else { font.line_height() },
                        text: t,
                        active: a.active,
                        room,
                    })
                })
                .collect()
        })
        .collect()
}

/// The labels' layout for cells of `width`×`height` (see [`Margins`]).
pub fn margins(
    width: u32,
    height: u32,
    hor_texts: &[Vec<Annotation>],
    ver_texts: &[Vec<Annotation>],
) -> Margins {
    layout(width, height, hor_texts, ver_texts).0
}

type Layout = (Margins, Vec<Vec<Line>>, Vec<Vec<Line>>, Vec<u32>, Vec<u32>);

fn layout(
    width: u32,
    height: u32,
    hor_texts: &[Vec<Annotation>],
    ver_texts: &[Vec<Annotation>],
) -> Layout {
    let fontsize = (width + height) / 25;
    let line_spacing = fontsize / 2;
    let font = Font::of_size(fontsize);
    let any_ver = ver_texts.iter().flatten().any(|a| !a.text.is_empty());
    let pad_left = if any_ver { width * 3 / 4 } else { 0 };
    let hor = lay_out(font, hor_texts, width);
    let ver = lay_out(font, ver_texts, pad_left);
    // A1111 sums (line height + spacing) and takes one spacing off for a column, a spacing
    // per line for a row.
    let hor_heights: Vec<u32> = hor
        .iter()
        .map(|l| {
            (l.iter().map(|x| x.height + line_spacing).sum::<u32>()).saturating_sub(line_spacing)
        })
        .collect();
    let ver_heights: Vec<u32> = ver
        .iter()
        .map(|l| l.iter().map(|x| x.height).sum::<u32>())
        .collect();
    let pad_top = match hor_heights.iter().sum::<u32>() {
        0 => 0,
        _ => hor_heights.iter().copied().max().unwrap_or(0) + line_spacing * 2,
    };
    (
        Margins {
            fontsize,
            line_spacing,
            pad_left,
            pad_top,
        },
        hor,
        ver,
        hor_heights,
        ver_heights,
    )
}

/// Draws lines centred on `cx`, from `y` down.
fn draw_lines(
    img: &mut RgbImage,
    fontsize: u32,
    cx: f64,
    mut y: f64,
    lines: &[Line],
    spacing: u32,
) {
    for line in lines {
        // A1111 shrinks the font until the line fits its room.
        let mut font = Font::of_size(fontsize);
        while font.width(&line.text) > line.room && font.scale > 1 {
            font.scale -= 1;
        }
        let w = font.width(&line.text);
        let h = font.line_height();
        let x = (cx - w as f64 / 2.0).round() as i64;
        let top = (y + line.height as f64 / 2.0 - h as f64 / 2.0).round() as i64;
        let color = if line.active {
            TEXT_ACTIVE
        } else {
            TEXT_INACTIVE
        };
        font.draw(img, x, top, &line.text, color);
        if !line.active {
            let mid = (y + line.height as f64 / 2.0) as i64;
            for dy in -2..2 {
                for px in (cx as i64 - line.width as i64 / 2)..(cx as i64 + line.width as i64 / 2) {
                    let py = mid + dy;
                    if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height()
                    {
                        img.put_pixel(px as u32, py as u32, TEXT_INACTIVE);
                    }
                }
            }
        }
        y += (line.height + spacing) as f64;
    }
}

/// A1111's `draw_grid_annotations`: the grid `im` of cells `width`×`height` spread apart by
/// `margin` pixels, with `hor_texts[col]` centred above each column and `ver_texts[row]`
/// left of each row.
pub fn draw_annotations(
    im: &RgbImage,
    width: u32,
    height: u32,
    hor_texts: &[Vec<Annotation>],
    ver_texts: &[Vec<Annotation>],
    margin: u32,
) -> RgbImage {
    let (m, hor, ver, hor_heights, ver_heights) = layout(width, height, hor_texts, ver_texts);
    let cols = (im.width() / width.max(1)).max(1);
    let rows = (im.height() / height.max(1)).max(1);
    let mut out = RgbImage::from_pixel(
        im.width() + m.pad_left + margin * (cols - 1),
        im.height() + m.pad_top + margin * (rows - 1),
        BACKGROUND,
    );
    for row in 0..rows {
        for col in 0..cols {
            let cell = image::imageops::crop_imm(im, width * col, height * row, width, height);
            image::imageops::replace(
                &mut out,
                &cell.to_image(),
                (m.pad_left + (width + margin) * col) as i64,
                (m.pad_top + (height + margin) * row) as i64,
            );
        }
    }
    for (col, lines) in hor.iter().enumerate().take(cols as usize) {
        let x = m.pad_left as f64 + ((width + margin) * col as u32) as f64 + width as f64 / 2.0;
        let y = m.pad_top as f64 / 2.0 - hor_heights[col] as f64 / 2.0;
        draw_lines(&mut out, m.fontsize, x, y, lines, m.line_spacing);
    }
    for (row, lines) in ver.iter().enumerate().take(rows as usize) {
        let x = m.pad_left as f64 / 2.0;
        let y = (m.pad_top + (height + margin) * row as u32) as f64 + height as f64 / 2.0
            - ver_heights[row] as f64 / 2.0;
        draw_lines(&mut out, m.fontsize, x, y, lines, m.line_spacing);
    }
    out
}

/// One tile of a [`TileGrid`]: where it sits and its pixels.
#[derive(Debug, Clone)]
pub struct Tile {
    /// Left edge in the whole image.
    pub x: u32,
    /// Top edge in the whole image.
    pub y: u32,
    /// The tile's pixels (`tile_w`×`tile_h`), replaced by the processed tile before
    /// [`combine_grid`].
    pub image: RgbImage,
}

/// An image cut into overlapping tiles (A1111's `Grid`), row by row.
#[derive(Debug, Clone)]
pub struct TileGrid {
    /// Rows of tiles, top to bottom, each left to right.
    pub rows: Vec<Vec<Tile>>,
    /// Tile width.
    pub tile_w: u32,
    /// Tile height.
    pub tile_h: u32,
    /// Whole image width.
    pub image_w: u32,
    /// Whole image height.
    pub image_h: u32,
    /// Pixels two neighbouring tiles share at least.
    pub overlap: u32,
}

impl TileGrid {
    /// Tiles in all.
    pub fn tile_count(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }
}

/// The tile columns (or rows) A1111 cuts `size` pixels into, and their left (top) edges.
fn tile_edges(size: u32, tile: u32, overlap: u32) -> Vec<u32> {
    let step = (tile - overlap).max(1);
    let count = (size.saturating_sub(overlap)).div_ceil(step).max(1);
    let d = if count > 1 {
        (size as f64 - tile as f64) / (count - 1) as f64
    } else {
        0.0
    };
    (0..count)
        .map(|i| {
            let e = (i as f64 * d) as u32;
            if e + tile >= size {
                size - tile
            } else {
                e
            }
        })
        .collect()
}

/// A1111's `split_grid`: tiles of `tile_w`×`tile_h` spread evenly over the image so that
/// neighbours overlap by `overlap` pixels at least. The image must be at least one tile in
/// each direction, and `overlap` less than a tile.
pub fn split_grid(image: &RgbImage, tile_w: u32, tile_h: u32, overlap: u32) -> TileGrid {
    let (w, h) = image.dimensions();
    let rows = tile_edges(h, tile_h, overlap)
        .into_iter()
        .map(|y| {
            tile_edges(w, tile_w, overlap)
                .into_iter()
                .map(|x| Tile {
                    x,
                    y,
                    image: image::imageops::crop_imm(image, x, y, tile_w, tile_h).to_image(),
                })
                .collect()
        })
        .collect();
    TileGrid {
        rows,
        tile_w,
        tile_h,
        image_w: w,
        image_h: h,
        overlap,
    }
}

/// Pastes `src` onto `dst` at (x, y), blending column `i` (or row `i`) of the first
/// `overlap` ones in with weight `i·255/overlap` as a PIL "L" mask (uint8), the rest
/// replacing what is there.
fn paste_blended(dst: &mut RgbImage, src: &RgbImage, x: u32, y: u32, overlap: u32, along_x: bool) {
    for sy in 0..src.height() {
        for sx in 0..src.width() {
            let (dx, dy) = (x + sx, y + sy);
            if dx >= dst.width() || dy >= dst.height() {
                continue;
            }
            let i = if along_x { sx } else { sy };
            let s = src.get_pixel(sx, sy);
            if i >= overlap {
                dst.put_pixel(dx, dy, *s);
                continue;
            }
            // PIL's paste with a mask: out = (src·m + dst·(255 − m)) / 255, rounded.
            let m = (i as f32 * 255.0 / overlap as f32) as u32;
            let d = dst.get_pixel_mut(dx, dy);
            for c in 0..3 {
                let v = s.0[c] as u32 * m + d.0[c] as u32 * (255 - m);
                d.0[c] = ((v + 127) / 255) as u8;
            }
        }
    }
}

/// A1111's `combine_grid`: each row's tiles joined left to right, each fading in over the
/// overlap from its left edge; then the rows joined top to bottom, fading in from their top
/// edge.
pub fn combine_grid(grid: &TileGrid) -> RgbImage {
    let mut out = RgbImage::new(grid.image_w, grid.image_h);
    for row in &grid.rows {
        let Some(first) = row.first() else { continue };
        let y = first.y;
        let mut line = RgbImage::new(grid.image_w, grid.tile_h);
        for tile in row {
            match tile.x {
                0 => image::imageops::replace(&mut line, &tile.image, 0, 0),
                x => paste_blended(&mut line, &tile.image, x, 0, grid.overlap, true),
            }
        }
        match y {
            0 => image::imageops::replace(&mut out, &line, 0, 0),
            y => paste_blended(&mut out, &line, 0, y, grid.overlap, false),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([v, v, v]))
    }

    fn noise(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 7 + y * 13) as u8, (x * x + y) as u8, (x ^ y) as u8])
        })
    }

    #[test]
    fn grid_places_images_row_by_row_and_centres_smaller_ones() {
        let imgs: Vec<_> = (0..5).map(|i| solid(4, 3, i * 10)).collect();
        let g = image_grid(&imgs, 2);
        assert_eq!(g.dimensions(), (12, 6));
        assert_eq!(g.get_pixel(0, 0).0[0], 0);
        assert_eq!(g.get_pixel(4, 0).0[0], 10);
        assert_eq!(g.get_pixel(8, 2).0[0], 20);
        assert_eq!(g.get_pixel(0, 3).0[0], 30);
        assert_eq!(g.get_pixel(4, 5).0[0], 40);
        // The sixth cell stays background.
        assert_eq!(*g.get_pixel(11, 5), BACKGROUND);
        let g = image_grid(&[solid(4, 4, 0), solid(2, 2, 50)], 1);
        assert_eq!(g.get_pixel(5, 1).0[0], 50);
        assert_eq!(*g.get_pixel(4, 0), BACKGROUND);
    }

    #[test]
    fn margins_follow_a1111() {
        let x = vec![vec![Annotation::new("10")], vec![Annotation::new("20")]];
        let y = vec![vec![Annotation::new("CFG Scale: 7.0")]];
        let m = margins(64, 64, &x, &y);
        assert_eq!(m.fontsize, 5);
        assert_eq!(m.line_spacing, 2);
        assert_eq!(m.pad_left, 48);
        // One line of 8 pixels (scale 1) plus two line spacings.
        assert_eq!(m.pad_top, 8 + 4);
        // A label wider than its column wraps: two lines and a spacing between them.
        let x = vec![
            vec![Annotation::new("Steps: 10")],
            vec![Annotation::new("")],
        ];
        assert_eq!(margins(64, 64, &x, &y).pad_top, 8 + 2 + 8 + 4);
        // At 512x512 the font is 40 (scale 4: 32-pixel lines), spacing 20.
        let m = margins(512, 512, &x, &y);
        assert_eq!(
            (m.fontsize, m.line_spacing, m.pad_left, m.pad_top),
            (40, 20, 384, 32 + 40)
        );
        let none = vec![vec![Annotation::new("")]];
        let m = margins(64, 64, &none, &none);
        assert_eq!((m.pad_left, m.pad_top), (0, 0));
    }

    #[test]
    fn annotated_grid_grows_by_pads_and_margins_and_keeps_the_cells() {
        let cells: Vec<_> = (0..4).map(|i| solid(64, 64, 40 + i * 40)).collect();
        let grid = image_grid(&cells, 2);
        let x = vec![vec![Annotation::new("a")], vec![Annotation::new("b")]];
        let y = vec![vec![Annotation::new("c")], vec![Annotation::new("d")]];
        let out = draw_annotations(&grid, 64, 64, &x, &y, 6);
        let m = margins(64, 64, &x, &y);
        assert_eq!(
            out.dimensions(),
            (128 + m.pad_left + 6, 128 + m.pad_top + 6)
        );
        // The bottom-right cell, moved by the pads and one margin.
        let (cx, cy) = (m.pad_left + 64 + 6 + 10, m.pad_top + 64 + 6 + 10);
        assert_eq!(out.get_pixel(cx, cy).0[0], 160);
        // The margin between cells is background; some label pixels are dark.
        assert_eq!(
            *out.get_pixel(m.pad_left + 64 + 2, m.pad_top + 10),
            BACKGROUND
        );
        let dark = (0..out.width())
            .flat_map(|x| (0..m.pad_top).map(move |y| (x, y)))
            .filter(|&(x, y)| *out.get_pixel(x, y) == TEXT_ACTIVE)
            .count();
        assert!(dark > 0, "column labels are drawn");
    }

    #[test]
    fn long_labels_wrap_at_spaces() {
        let lines = wrap(Font { scale: 1 }, "one two three four", 8 * 9);
        assert_eq!(lines, vec!["one two", "three", "four"]);
    }

    #[test]
    fn split_then_combine_unchanged_gives_the_image_back() {
        let img = noise(300, 200);
        let grid = split_grid(&img, 128, 96, 32);
        assert!(grid.tile_count() > 1);
        for row in &grid.rows {
            for t in row {
                assert_eq!(t.image.dimensions(), (128, 96));
                assert!(t.x + 128 <= 300 && t.y + 96 <= 200);
            }
        }
        assert_eq!(combine_grid(&grid), img);
    }

    #[test]
    fn tiles_cover_the_image_as_a1111_spreads_them() {
        // A1111: cols = ceil((w - overlap) / (tile - overlap)), edges int(i * dx), the last
        // one flush with the right edge.
        assert_eq!(tile_edges(1024, 512, 64), vec![0, 256, 512]);
        assert_eq!(tile_edges(512, 512, 64), vec![0]);
        assert_eq!(tile_edges(1000, 512, 64), vec![0, 244, 488]);
    }

    #[test]
    fn overlaps_fade_from_the_left_tile_into_the_right_one() {
        let mut grid = split_grid(&solid(24, 8, 0), 16, 8, 8);
        assert_eq!(grid.rows[0].len(), 2);
        grid.rows[0][0].image = solid(16, 8, 0);
        grid.rows[0][1].image = solid(16, 8, 200);
        let out = combine_grid(&grid);
        // Tile 2 starts at x = 8: over x in 8..16 its weight grows i·255/8 → i·200/8 here.
        assert_eq!(out.get_pixel(7, 0).0[0], 0);
        assert_eq!(out.get_pixel(8, 0).0[0], 0);
        let mid = out.get_pixel(12, 0).0[0];
        assert!((99..=101).contains(&mid), "{mid}");
        assert_eq!(out.get_pixel(16, 0).0[0], 200);
        assert!(out.get_pixel(15, 0).0[0] > mid);
    }
}
