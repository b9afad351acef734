//! `sdkube generate`'s A1111 scripts: `--xyz-x/--xyz-y/--xyz-z`, `--prompt-matrix`,
//! `--sd-upscale`, turned into the same script arguments the server parses, and run with
//! the command's engine.

use anyhow::Context;
use image::DynamicImage;
use sdkube_pipeline::sampler::Flow;
use sdkube_pipeline::scripts::{
    Cell, CellImage, CellRunner, Mode, Script, ScriptError, ScriptImage, UpscalerChoice,
};
use sdkube_pipeline::{Engine, HiresError, Progress};
use serde_json::{json, Value};

use super::ImageUpscaler;

/// The options of A1111's scripts.
#[derive(clap::Args, Debug)]
pub struct ScriptArgs {
    /// A1111's X/Y/Z plot: the X axis as AXIS:VALUES, e.g. "Steps:10,20" or "CFG Scale:5-9
    /// (+2)" (A1111's axis labels and value syntax: lists, ranges, "quoted, values").
    /// Writes the grid (and with --xyz-images each image).
    #[arg(long, value_name = "AXIS:VALUES")]
    pub xyz_x: Option<String>,
    /// X/Y/Z plot: the Y axis (rows), as --xyz-x.
    #[arg(long, value_name = "AXIS:VALUES")]
    pub xyz_y: Option<String>,
    /// X/Y/Z plot: the Z axis (a grid per value, side by side), as --xyz-x.
    #[arg(long, value_name = "AXIS:VALUES")]
    pub xyz_z: Option<String>,
    /// X/Y/Z plot: also write each cell's image after the grid.
    #[arg(long)]
    pub xyz_images: bool,
    /// X/Y/Z plot: also write each Z value's grid.
    #[arg(long)]
    pub xyz_sub_grids: bool,
    /// X/Y/Z plot: no axis labels on the grid.
    #[arg(long)]
    pub xyz_no_legend: bool,
    /// A1111's prompt matrix: the prompt's `|`-separated parts after the first are
    /// optional; one image per combination, then the labelled grid first.
    #[arg(long)]
    pub prompt_matrix: bool,
    /// X/Y/Z plot and prompt matrix: pixels between the grid's cells.
    #[arg(long, default_value_t = 0)]
    pub grid_margin: u32,
    /// A1111's SD upscale (needs --init-image): upscale the image by this factor with
    /// --upscaler, then img2img it in tiles of --width x --height.
    #[arg(long, value_name = "FACTOR")]
    pub sd_upscale: Option<f64>,
    /// SD upscale: pixels neighbouring tiles share (blended).
    #[arg(long, default_value_t = 64)]
    pub sd_upscale_overlap: u32,
    /// SD upscale: "Lanczos", "Nearest", "None" or a RealESRGAN weight file.
    #[arg(long, default_value = "Lanczos")]
    pub upscaler: String,
}

/// `LABEL:VALUES` of an `--xyz-*` option: an A1111 axis label and its values.
fn axis(option: &str, spec: Option<&String>) -> anyhow::Result<(Value, Value)> {
    let Some(spec) = spec else {
        return Ok((json!("Nothing"), json!("")));
    };
    let (label, values) = spec.split_once(':').with_context(|| {
        format!("{option} {spec:?}: expected AXIS:VALUES, e.g. \"Steps:10,20\"")
    })?;
    Ok((json!(label.trim()), json!(values.trim())))
}

/// The script the options ask for, if any.
pub(super) fn script_of(args: &ScriptArgs, mode: Mode) -> anyhow::Result<Option<Script>> {
    let chosen = [
        args.xyz_x.is_some() || args.xyz_y.is_some() || args.xyz_z.is_some(),
        args.prompt_matrix,
        args.sd_upscale.is_some(),
    ];
    if chosen.iter().filter(|c| **c).count() > 1 {
        anyhow::bail!("--xyz-*, --prompt-matrix and --sd-upscale are one script each: pick one");
    }
    let (name, script_args) = if chosen[0] {
        let (xt, xv) = axis("--xyz-x", args.xyz_x.as_ref())?;
        let (yt, yv) = axis("--xyz-y", args.xyz_y.as_ref())?;
        let (zt, zv) = axis("--xyz-z", args.xyz_z.as_ref())?;
        let a = json!([
            xt,
            xv,
            [],
            yt,
            yv,
            [],
            zt,
            zv,
            [],
            !args.xyz_no_legend,
            args.xyz_images,
            args.xyz_sub_grids,
            false,
            false,
            false,
            false,
            args.grid_margin,
            true
        ]);
        ("X/Y/Z plot", a)
    } else if chosen[1] {
        (
            "Prompt matrix",
            json!([false, false, "positive", "comma", args.grid_margin]),
        )
    } else if let Some(scale) = args.sd_upscale {
        ("SD upscale", json!(["", args.sd_upscale_overlap, 0, scale]))
    } else {
        return Ok(None);
    };
    let upscaler = args.upscaler.clone();
    let names = move |_: UpscalerChoice| Ok::<_, ScriptError>(upscaler.clone());
    let items = script_args.as_array().cloned().unwrap_or_default();
    Script::parse(name, &items, mode, &names).map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

/// Cells through the command's engine, or for a checkpoint axis the cell's model's: one model
/// on the device at a time, the previous leaving before the next loads (the axis is the
/// outer loop, so each loads once).
pub(super) struct CommandCells<'a> {
    pub engine: Option<Engine>,
    /// An engine for a checkpoint (path or catalog name), as the command's.
    pub load: &'a dyn Fn(&str) -> anyhow::Result<Engine>,
    pub upscaler: Option<&'a mut ImageUpscaler>,
    pub bar: &'a indicatif::ProgressBar,
}

impl CommandCells<'_> {
    /// The engine of `checkpoint` (the current one when `None` or already it).
    fn engine(&mut self, checkpoint: Option<&str>) -> anyhow::Result<&mut Engine> {
        let current = self.engine.as_ref().map(|e| e.model_name().to_string());
        if let Some(wanted) = checkpoint {
            let name = sdkube_models::model_name(std::path::Path::new(wanted));
            if current.as_deref() != Some(name.as_str()) {
                self.engine = None;
                self.engine = Some((self.load)(wanted)?);
            }
        }
        self.engine.as_mut().context("no model loaded")
    }
}

impl CellRunner for CommandCells<'_> {
    type Error = anyhow::Error;

    fn run_cell(&mut self, cell: &Cell) -> anyhow::Result<Option<CellImage>> {
        let bar = self.bar;
        self.engine(cell.checkpoint.as_deref())?;
        let upscaler = self.upscaler.as_deref_mut();
        let engine = self.engine.as_mut().context("no model loaded")?;
        engine.validate(&cell.request)?;
        let mut on_step = |p: &Progress| {
            bar.set_message(format!("step {}/{}", p.step + 1, p.total));
            Flow::Continue
        };
        let mut images = engine.generate(&cell.request, &mut on_step)?;
        let Some(mut g) = images.pop() else {
            return Ok(None);
        };
        if let (Some(h), Some(up)) = (&cell.hires, upscaler) {
            let mut upscale = |_: &str, img: &DynamicImage, f: f32| up.run(img, f);
            g = engine
                .hires_fix(&cell.request, &g, h, &mut upscale, &mut on_step)
                .map_err(|e| match e {
                    HiresError::Upscale(e) => e.context("hires fix upscaler"),
                    HiresError::Generate(e) => anyhow::Error::from(e).context("hires fix"),
                })?;
        }
        bar.inc(1);
        Ok(Some(CellImage {
            image: g.image,
            seed: g.seed,
            parameters: g.parameters,
        }))
    }

    fn upscale(
        &mut self,
        name: &str,
        image: &DynamicImage,
        factor: f32,
    ) -> anyhow::Result<DynamicImage> {
        let device = self.engine(None)?.device().clone();
        ImageUpscaler::new(name, &device)?.run(image, factor)
    }
}

/// Runs a script and returns its images (grids first), as the server would.
pub(super) fn run(
    script: &Script,
    base: &Cell,
    engine: Engine,
    upscaler: Option<&mut ImageUpscaler>,
    load: &dyn Fn(&str) -> anyhow::Result<Engine>,
) -> anyhow::Result<Vec<ScriptImage>> {
    let cells = script.cells(base, &mut sdkube_pipeline::random_seed)?;
    let bar = indicatif::ProgressBar::new(cells.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} images  {msg}  {elapsed}",
    )?);
    let mut runner = CommandCells {
        engine: Some(engine),
        load,
        upscaler,
        bar: &bar,
    };
    let out = script.run(base, 1, &mut runner, &mut sdkube_pipeline::random_seed)?;
    bar.finish_and_clear();
    Ok(out.images)
}
