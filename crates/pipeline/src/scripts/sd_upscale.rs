//! A1111's "SD upscale" (img2img): the init image upscaled by a factor with an upscaler,
//! cut into tiles of the request's size overlapping by `overlap` pixels, each tile run
//! through img2img, the tiles blended back together along their overlaps.

use image::DynamicImage;

use super::grid::{combine_grid, split_grid};
use super::{
    add_fields, blank_like, Args, Cell, CellRunner, ScriptError, ScriptImage, ScriptOutput,
    MAX_CELLS,
};

/// How SD upscale's arguments name the upscaler: A1111's UI sends its index in
/// `/sdapi/v1/upscalers`; A1111 takes its name as well (any case), as its own API tests send it.
#[derive(Debug, Clone, Copy)]
pub enum UpscalerChoice<'a> {
    /// Position in the upscaler list.
    Index(usize),
    /// Name, any case.
    Name(&'a str),
}

/// SD upscale's arguments: `[info (ignored), overlap, upscaler_index, scale_factor]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SdUpscale {
    /// Pixels neighbouring tiles share.
    pub overlap: u32,
    /// The upscaler's name (resolved from its index in the server's list).
    pub upscaler: String,
    /// How much larger the result is than the init image.
    pub scale: f64,
}

impl SdUpscale {
    /// Parses A1111's `script_args`; `upscaler_name` resolves the upscaler.
    pub fn from_args(
        args: &[serde_json::Value],
        upscaler_name: &dyn Fn(UpscalerChoice) -> Result<String, ScriptError>,
    ) -> Result<Self, ScriptError> {
        let a = Args::new("SD upscale", args, 4)?;
        let overlap = a.uint(1, "overlap", 64, 4096)? as u32;
        let upscaler = match args.get(2) {
            Some(serde_json::Value::String(name)) => upscaler_name(UpscalerChoice::Name(name))?,
            _ => upscaler_name(UpscalerChoice::Index(
                a.uint(2, "upscaler_index", 0, 1000)? as usize
            ))?,
        };
        let scale = a.float(3, "scale_factor", 2.0)?;
        if !(1.0..=8.0).contains(&scale) {
            return Err(ScriptError(format!(
                "script_args[3] (SD upscale scale_factor) must be between 1 and 8, got {scale}"
            )));
        }
        Ok(Self {
            overlap,
            upscaler,
            scale,
        })
    }

    /// The size the init image is upscaled to (the upscalers round to the nearest pixel).
    fn upscaled_size(&self, w: u32, h: u32) -> (u32, u32) {
        if self.upscaler.eq_ignore_ascii_case("None") {
            return (w, h);
        }
        let s = self.scale as f32;
        (
            ((w as f32 * s).round() as u32).max(1),
            ((h as f32 * s).round() as u32).max(1),
        )
    }

    /// Checks that tiles of the request's size fit the upscaled image.
    fn check_tiles(&self, base: &Cell, size: (u32, u32)) -> Result<(), ScriptError> {
        let (tw, th) = (base.request.width as u32, base.request.height as u32);
        if self.overlap >= tw.min(th) {
            return Err(ScriptError(format!(
                "script_args[1] (SD upscale overlap) {} must be less than the tile size \
                 {tw}x{th} (the request's width and height)",
                self.overlap
            )));
        }
        if size.0 < tw || size.1 < th {
            return Err(ScriptError(format!(
                "SD upscale: the upscaled image {}x{} is smaller than a tile ({tw}x{th}, the \
                 request's width and height); lower them or raise scale_factor",
                size.0, size.1
            )));
        }
        Ok(())
    }

    /// A tile's seed: A1111 runs the tiles in batches of the request's batch size, each
    /// batch from the previous batch's first seed + 1, image j of a batch at + j.
    fn tile_seed(seed: u64, tile: usize, batch_size: usize) -> u64 {
        let b = batch_size.max(1);
        seed + (tile / b) as u64 + (tile % b) as u64
    }

    /// The cells the tiles of one upscale will be, from the init image's size.
    pub fn estimated_cells(&self, base: &Cell) -> Result<Vec<Cell>, ScriptError> {
        let init = base
            .request
            .init_image
            .as_ref()
            .ok_or_else(|| ScriptError("SD upscale needs an init image".to_string()))?;
        let size = self.upscaled_size(init.width(), init.height());
        self.check_tiles(base, size)?;
        let probe = image::RgbImage::new(size.0, size.1);
        let grid = split_grid(
            &probe,
            base.request.width as u32,
            base.request.height as u32,
            self.overlap,
        );
        if grid.tile_count() > MAX_CELLS {
            return Err(ScriptError(format!(
                "SD upscale makes {} tiles, over the limit of {MAX_CELLS}",
                grid.tile_count()
            )));
        }
        let mut cell = base.clone();
        cell.request.batch_size = 1;
        cell.request.init_image = None;
        Ok(vec![cell; grid.tile_count()])
    }

    /// Upscales, runs every tile as img2img, and blends them back (one image per batch
    /// count, each from seed + n, as A1111).
    pub fn run<R: CellRunner>(
        &self,
        base: &Cell,
        runner: &mut R,
        n_iter: usize,
    ) -> Result<ScriptOutput, R::Error> {
        self.estimated_cells(base)?;
        let init = base
            .request
            .init_image
            .as_ref()
            .ok_or_else(|| ScriptError("SD upscale needs an init image".to_string()))?;
        let upscaled: DynamicImage = if self.upscaler.eq_ignore_ascii_case("None") {
            init.clone()
        } else {
            runner.upscale(&self.upscaler, init, self.scale as f32)?
        };
        self.check_tiles(base, (upscaled.width(), upscaled.height()))?;
        let (tw, th) = (base.request.width as u32, base.request.height as u32);
        let mut out = ScriptOutput::default();
        let fields = [
            ("SD upscale overlap".to_string(), self.overlap.to_string()),
            ("SD upscale upscaler".to_string(), self.upscaler.clone()),
        ];
        let mut first_info = None;
        for n in 0..n_iter.max(1) {
            let start = base.request.seed + n as u64;
            let mut grid = split_grid(&upscaled.to_rgb8(), tw, th, self.overlap);
            let mut k = 0;
            for row in &mut grid.rows {
                for tile in row {
                    let mut cell = base.clone();
                    cell.request.batch_size = 1;
                    cell.request.seed = Self::tile_seed(start, k, base.request.batch_size);
                    cell.request.subseed = base.request.subseed + k as u64;
                    cell.request.init_image = Some(DynamicImage::ImageRgb8(tile.image.clone()));
                    let done = runner
                        .run_cell(&cell)?
                        .unwrap_or_else(|| blank_like(&cell, cell.request.seed));
                    if first_info.is_none() {
                        let mut info = done.parameters.clone();
                        add_fields(&mut info, &fields);
                        first_info = Some(info);
                    }
                    tile.image = done.image;
                    k += 1;
                }
            }
            out.images.push(ScriptImage {
                image: combine_grid(&grid),
                infotext: first_info.clone().unwrap_or_default(),
                seed: start,
                grid: false,
            });
            out.all_prompts.push(base.request.prompt.clone());
            out.all_negative_prompts
                .push(base.request.negative_prompt.clone());
            out.all_seeds.push(start);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infotext::Infotext;
    use crate::scripts::CellImage;
    use crate::Request;
    use image::{Rgb, RgbImage};
    use serde_json::json;

    fn names(choice: UpscalerChoice) -> Result<String, ScriptError> {
        let list = ["None", "Lanczos", "Nearest"];
        match choice {
            UpscalerChoice::Index(i) => list.get(i).map(|s| s.to_string()),
            UpscalerChoice::Name(n) => list
                .iter()
                .find(|s| s.eq_ignore_ascii_case(n))
                .map(|s| s.to_string()),
        }
        .ok_or_else(|| ScriptError(format!("no upscaler {choice:?}")))
    }

    #[test]
    fn args_default_and_check() {
        let s = SdUpscale::from_args(&[], &names).unwrap();
        assert_eq!(
            s,
            SdUpscale {
                overlap: 64,
                upscaler: "None".into(),
                scale: 2.0
            }
        );
        let s = SdUpscale::from_args(&[json!(""), json!(32), json!(1), json!(3)], &names).unwrap();
        assert_eq!(
            (s.overlap, s.upscaler.as_str(), s.scale),
            (32, "Lanczos", 3.0)
        );
        assert!(SdUpscale::from_args(&[json!(""), json!(32), json!(9)], &names).is_err());
        // A1111 takes the upscaler's name too (its own API tests send "Lanczos").
        let s = SdUpscale::from_args(&[json!(""), json!(8), json!("lanczos"), json!(2.0)], &names)
            .unwrap();
        assert_eq!(s.upscaler, "Lanczos");
        assert!(SdUpscale::from_args(&[json!(""), json!(8), json!("Bogus")], &names).is_err());
        let e = SdUpscale::from_args(&[json!(""), json!(-1)], &names).unwrap_err();
        assert!(e.0.contains("overlap"), "{e}");
    }

    #[test]
    fn tile_seeds_follow_a1111s_batches() {
        let seeds: Vec<_> = (0..5).map(|t| SdUpscale::tile_seed(10, t, 1)).collect();
        assert_eq!(seeds, [10, 11, 12, 13, 14]);
        let seeds: Vec<_> = (0..4).map(|t| SdUpscale::tile_seed(10, t, 2)).collect();
        assert_eq!(seeds, [10, 11, 11, 12]);
    }

    /// Returns each tile as it came (img2img that changes nothing), so the result is the
    /// upscaled image itself.
    struct Identity;

    impl CellRunner for Identity {
        type Error = ScriptError;
        fn run_cell(&mut self, cell: &Cell) -> Result<Option<CellImage>, ScriptError> {
            let r = &cell.request;
            Ok(Some(CellImage {
                image: r.init_image.as_ref().unwrap().to_rgb8(),
                seed: r.seed,
                parameters: Infotext::new(&r.prompt, ""),
            }))
        }
        fn upscale(
            &mut self,
            _: &str,
            image: &DynamicImage,
            factor: f32,
        ) -> Result<DynamicImage, ScriptError> {
            let (w, h) = (
                image.width() as f32 * factor,
                image.height() as f32 * factor,
            );
            Ok(image.resize_exact(w as u32, h as u32, image::imageops::FilterType::Nearest))
        }
    }

    #[test]
    fn unchanged_tiles_give_the_upscaled_image() {
        let init = RgbImage::from_fn(40, 30, |x, y| Rgb([x as u8 * 5, y as u8 * 7, 9]));
        let base = Cell {
            request: Request {
                width: 32,
                height: 32,
                seed: 5,
                init_image: Some(DynamicImage::ImageRgb8(init.clone())),
                ..Request::default()
            },
            hires: None,
            checkpoint: None,
        };
        let s = SdUpscale {
            overlap: 8,
            upscaler: "Nearest".into(),
            scale: 2.0,
        };
        // 80x60 in tiles of 32 overlapping by 8: ceil(72 / 24) = 3 columns, ceil(52 / 24) = 3 rows.
        assert_eq!(s.estimated_cells(&base).unwrap().len(), 3 * 3);
        let out = s.run(&base, &mut Identity, 1).unwrap();
        assert_eq!(out.images.len(), 1);
        let want = DynamicImage::ImageRgb8(init).resize_exact(
            80,
            60,
            image::imageops::FilterType::Nearest,
        );
        assert_eq!(out.images[0].image, want.to_rgb8());
        let info = out.images[0].infotext.to_string();
        assert!(
            info.contains("SD upscale overlap: 8, SD upscale upscaler: Nearest"),
            "{info}"
        );
        let small = Cell {
            request: Request {
                width: 128,
                ..base.request.clone()
            },
            ..base.clone()
        };
        assert!(s
            .estimated_cells(&small)
            .unwrap_err()
            .0
            .contains("smaller than a tile"));
    }
}
