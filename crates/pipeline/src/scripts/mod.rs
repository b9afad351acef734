//! A1111's scripts run through `script_name`/`script_args` (AUTOMATIC1111 1.10's
//! `scripts/xyz_grid.py`, `scripts/prompt_matrix.py`, `scripts/sd_upscale.py`): their
//! arguments parsed and checked, the generations they make ("cells"), and how the results
//! become A1111's output (grids first, then the single images, with the infotexts, prompts
//! and seeds A1111 returns). Generating a cell is the caller's: the server and the CLI each
//! run cells through their engine with a [`CellRunner`].

pub mod grid;
pub mod prompt_matrix;
pub mod sd_upscale;
pub mod values;
pub mod xyz;

use image::{DynamicImage, RgbImage};
use serde_json::Value;

use crate::generate::Request;
use crate::hires::HiresFix;
use crate::infotext::Infotext;

pub use prompt_matrix::PromptMatrix;
pub use sd_upscale::{SdUpscale, UpscalerChoice};
pub use xyz::XyzPlot;

/// Most cells (generations) one script may ask for.
pub const MAX_CELLS: usize = 256;

/// A script's arguments that cannot be used; the message names the argument and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ScriptError(pub String);

/// Which tab a script runs from: the axis lists of the X/Y/Z plot differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// txt2img.
    Txt2Img,
    /// img2img (and inpainting).
    Img2Img,
}

/// One generation a script asks for: the request, its hires fix, and the checkpoint it
/// needs when that differs from the job's (X/Y/Z plot's "Checkpoint name").
#[derive(Debug, Clone)]
pub struct Cell {
    /// The request (batch size 1).
    pub request: Request,
    /// Its hires fix, as the job's with the cell's values.
    pub hires: Option<HiresFix>,
    /// A checkpoint to switch to first.
    pub checkpoint: Option<String>,
}

impl Cell {
    /// Device steps this cell takes (for progress).
    pub fn steps(&self) -> usize {
        let r = &self.request;
        let first = match r.init_image {
            Some(_) => (r.steps as f64 * r.strength.clamp(0.0, 1.0)).ceil() as usize,
            None => r.steps,
        };
        first.max(1) + self.hires.as_ref().map_or(0, |h| h.steps_after(r.steps))
    }
}

/// A finished image of a cell: pixels, seed and generation parameters.
#[derive(Debug, Clone)]
pub struct CellImage {
    /// The image.
    pub image: RgbImage,
    /// Its seed.
    pub seed: u64,
    /// Its infotext (as the caller wrote it: hires, face restoration…).
    pub parameters: Infotext,
}

/// Runs a script's generations: the server's worker and the CLI implement it over their
/// engine, model switching and upscalers.
pub trait CellRunner {
    /// What a cell can fail with.
    type Error: From<ScriptError>;
    /// Generates one cell. An empty result (the job was interrupted) leaves a black cell,
    /// as A1111 does.
    fn run_cell(&mut self, cell: &Cell) -> Result<Option<CellImage>, Self::Error>;
    /// Resizes `image` by `factor` with a named upscaler (SD upscale).
    fn upscale(
        &mut self,
        name: &str,
        image: &DynamicImage,
        factor: f32,
    ) -> Result<DynamicImage, Self::Error>;
}

/// An image of a script's output.
#[derive(Debug, Clone)]
pub struct ScriptImage {
    /// The pixels.
    pub image: RgbImage,
    /// Its infotext (a grid carries its first cell's, with the script's fields).
    pub infotext: Infotext,
    /// The seed (a grid's is its first cell's).
    pub seed: u64,
    /// Whether it is a grid.
    pub grid: bool,
}

/// What a script returns, as A1111 returns it: `images` and their `infotexts` line up;
/// `all_prompts`, `all_negative_prompts` and `all_seeds` line up with the images from
/// `index_of_first_image` on (A1111 leaves the main grid out of them).
#[derive(Debug, Clone, Default)]
pub struct ScriptOutput {
    /// Grids first, then the single images.
    pub images: Vec<ScriptImage>,
    /// Prompts of `images[index_of_first_image..]` (cells left out of `images` still count).
    pub all_prompts: Vec<String>,
    /// Their negative prompts.
    pub all_negative_prompts: Vec<String>,
    /// Their seeds.
    pub all_seeds: Vec<u64>,
    /// Where the images that `all_prompts` describe begin.
    pub index_of_first_image: usize,
}

/// A script a request names, with its arguments parsed.
#[derive(Debug, Clone)]
pub enum Script {
    /// "X/Y/Z plot".
    Xyz(XyzPlot),
    /// "Prompt matrix".
    PromptMatrix(PromptMatrix),
    /// "SD upscale" (img2img).
    SdUpscale(SdUpscale),
}

/// The scripts sdkube runs, by A1111's titles (`/sdapi/v1/scripts` lists them).
pub const SCRIPT_TITLES: [&str; 3] = ["X/Y/Z plot", "Prompt matrix", "SD upscale"];

/// Whether `name` is a script sdkube runs (A1111 matches titles case-insensitively).
pub fn is_known(name: &str) -> bool {
    SCRIPT_TITLES
        .iter()
        .any(|t| t.eq_ignore_ascii_case(name.trim()))
}

impl Script {
    /// Parses `script_args` for the script `name`; `None` when sdkube has no such script.
    /// `upscaler_name` turns SD upscale's upscaler (index or name) into its name.
    pub fn parse(
        name: &str,
        args: &[Value],
        mode: Mode,
        upscaler_name: &dyn Fn(UpscalerChoice) -> Result<String, ScriptError>,
    ) -> Result<Option<Self>, ScriptError> {
        let name = name.trim();
        Ok(Some(if name.eq_ignore_ascii_case("X/Y/Z plot") {
            Script::Xyz(XyzPlot::from_args(args, mode)?)
        } else if name.eq_ignore_ascii_case("Prompt matrix") {
            Script::PromptMatrix(PromptMatrix::from_args(args)?)
        } else if name.eq_ignore_ascii_case("SD upscale") {
            if mode != Mode::Img2Img {
                return Err(ScriptError(
                    "script_name \"SD upscale\" runs on img2img only".into(),
                ));
            }
            Script::SdUpscale(SdUpscale::from_args(args, upscaler_name)?)
        } else {
            return Ok(None);
        }))
    }

    /// The cells the script will generate from `base` (seeds drawn with `draw_seed` where
    /// a cell keeps -1), in the order they run; for SD upscale an estimate from the init
    /// image's size (its tiles are known once the image is upscaled).
    pub fn cells(
        &self,
        base: &Cell,
        draw_seed: &mut dyn FnMut() -> u64,
    ) -> Result<Vec<Cell>, ScriptError> {
        match self {
            Script::Xyz(x) => Ok(x
                .cells(base, draw_seed)?
                .into_iter()
                .map(|c| c.cell)
                .collect()),
            Script::PromptMatrix(p) => p.cells(base),
            Script::SdUpscale(s) => s.estimated_cells(base),
        }
    }

    /// Runs the script: its cells through `runner`, then its grids. `n_iter` is the
    /// request's batch count: SD upscale makes one image per batch; the X/Y/Z plot and the
    /// prompt matrix keep one image per cell, as A1111's grids do.
    pub fn run<R: CellRunner>(
        &self,
        base: &Cell,
        n_iter: usize,
        runner: &mut R,
        draw_seed: &mut dyn FnMut() -> u64,
    ) -> Result<ScriptOutput, R::Error> {
        match self {
            Script::Xyz(x) => x.run(base, runner, draw_seed),
            Script::PromptMatrix(p) => p.run(base, runner),
            Script::SdUpscale(s) => s.run(base, runner, n_iter),
        }
    }
}

/// Adds a script's fields to an infotext before `Version`, where A1111 puts
/// `extra_generation_params`.
pub(crate) fn add_fields(info: &mut Infotext, fields: &[(String, String)]) {
    let version = info.remove("Version");
    for (k, v) in fields {
        info.push(k, v);
    }
    if let Some(v) = version {
        info.push("Version", v);
    }
}

/// A black cell where a generation gave nothing (interrupted), as A1111 leaves one.
pub(crate) fn blank_like(base: &Cell, seed: u64) -> CellImage {
    let r = &base.request;
    let (w, h) = base
        .hires
        .as_ref()
        .map_or((r.width, r.height), |h| (h.width, h.height));
    CellImage {
        image: RgbImage::new(w as u32, h as u32),
        seed,
        parameters: Infotext::new(&r.prompt, &r.negative_prompt),
    }
}

/// Reading positional `script_args`: a missing or null argument takes A1111's default.
pub(crate) struct Args<'a> {
    script: &'static str,
    args: &'a [Value],
}

impl<'a> Args<'a> {
    /// `script`'s arguments, refused when there are more than the `count` it takes.
    pub fn new(script: &'static str, args: &'a [Value], count: usize) -> Result<Self, ScriptError> {
        if args.len() > count {
            return Err(ScriptError(format!(
                "script_args: {script} takes {count} arguments, got {}",
                args.len()
            )));
        }
        Ok(Self { script, args })
    }

    fn get(&self, i: usize) -> Option<&Value> {
        self.args.get(i).filter(|v| !v.is_null())
    }

    fn bad(&self, i: usize, name: &str, want: &str) -> ScriptError {
        ScriptError(format!(
            "script_args[{i}] ({} {name}) must be {want}, got {}",
            self.script,
            self.args.get(i).map_or("nothing".into(), |v| v.to_string())
        ))
    }

    pub fn bool(&self, i: usize, name: &str, default: bool) -> Result<bool, ScriptError> {
        match self.get(i) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(false),
            Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(true),
            Some(_) => Err(self.bad(i, name, "true or false")),
        }
    }

    pub fn uint(&self, i: usize, name: &str, default: u64, max: u64) -> Result<u64, ScriptError> {
        match self.get(i) {
            None => Ok(default),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= max as f64 => Ok(f as u64),
                _ => Err(self.bad(i, name, &format!("a whole number from 0 to {max}"))),
            },
            Some(_) => Err(self.bad(i, name, &format!("a whole number from 0 to {max}"))),
        }
    }

    pub fn float(&self, i: usize, name: &str, default: f64) -> Result<f64, ScriptError> {
        match self.get(i) {
            None => Ok(default),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| self.bad(i, name, "a number")),
            Some(Value::String(s)) => s.trim().parse().map_err(|_| self.bad(i, name, "a number")),
            Some(_) => Err(self.bad(i, name, "a number")),
        }
    }

    pub fn string(&self, i: usize, name: &str, default: &str) -> Result<String, ScriptError> {
        match self.get(i) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(_) => Err(self.bad(i, name, "a string")),
        }
    }

    /// A dropdown's list of strings (a single string counts as a CSV line).
    pub fn strings(&self, i: usize, name: &str) -> Result<Vec<String>, ScriptError> {
        match self.get(i) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(self.bad(i, name, "a list of strings")),
                })
                .collect(),
            Some(Value::String(s)) => Ok(values::csv_values(s)),
            Some(_) => Err(self.bad(i, name, "a list of strings")),
        }
    }
}
