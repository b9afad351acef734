//! A1111's "X/Y/Z plot": up to three axes of values, a generation per combination, a grid
//! per Z value (X across, Y down) and a grid of those grids. Axis types are indices into
//! A1111 1.10's axis list of the tab (txt2img and img2img lists differ) or their labels.

use super::grid::{draw_annotations, image_grid, Annotation};
use super::values::{csv_line, csv_values, float_values, int_values, python_float};
use super::{
    add_fields, blank_like, Args, Cell, CellImage, CellRunner, Mode, ScriptError, ScriptImage,
    ScriptOutput, MAX_CELLS,
};

/// Which tab lists an axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tab {
    Both,
    Txt2Img,
    Img2Img,
}

/// How an axis's values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Float,
    Text,
}

/// How a value is written in the legend (A1111's `format_value*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Legend {
    /// `Label: value`.
    WithLabel,
    /// The value alone.
    Value,
    /// A file name without its folders.
    FileName,
    /// Nothing.
    Empty,
}

/// The axes sdkube acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// One cell, nothing changed.
    Nothing,
    /// The seed.
    Seed,
    /// The variation seed.
    VarSeed,
    /// The variation strength.
    VarStrength,
    /// Sampling steps.
    Steps,
    /// The hires fix's second-pass steps.
    HiresSteps,
    /// CFG scale.
    CfgScale,
    /// Search and replace in the prompts.
    PromptSr,
    /// The sampler.
    Sampler,
    /// The checkpoint (a model switch per value).
    Checkpoint,
    /// The schedule type.
    ScheduleType,
    /// Clip skip.
    ClipSkip,
    /// Denoising strength (img2img, or the hires fix's).
    Denoising,
    /// The hires fix's upscaler.
    HiresUpscaler,
    /// `WxH`.
    Size,
}

struct AxisDef {
    label: &'static str,
    tab: Tab,
    kind: Kind,
    /// A dropdown in A1111's UI: its values come from `*_values_dropdown` unless
    /// `csv_mode`.
    choices: bool,
    /// A1111's cost: the costliest axis is the outermost loop (fewest model switches).
    cost: f32,
    legend: Legend,
    axis: Option<Axis>,
}

const fn def(label: &'static str, tab: Tab, kind: Kind, axis: Option<Axis>) -> AxisDef {
    AxisDef {
        label,
        tab,
        kind,
        choices: false,
        cost: 0.0,
        legend: Legend::WithLabel,
        axis,
    }
}

const fn choices(mut d: AxisDef) -> AxisDef {
    d.choices = true;
    d
}

const fn legend(mut d: AxisDef, legend: Legend) -> AxisDef {
    d.legend = legend;
    d
}

const fn cost(mut d: AxisDef, cost: f32) -> AxisDef {
    d.cost = cost;
    d
}

use Kind::{Float, Int, Text};
use Tab::{Both, Img2Img, Txt2Img};

/// A1111 1.10's `axis_options`, in order.
const AXES: [AxisDef; 46] = [
    legend(
        def("Nothing", Both, Text, Some(Axis::Nothing)),
        Legend::Empty,
    ),
    def("Seed", Both, Int, Some(Axis::Seed)),
    def("Var. seed", Both, Int, Some(Axis::VarSeed)),
    def("Var. strength", Both, Float, Some(Axis::VarStrength)),
    def("Steps", Both, Int, Some(Axis::Steps)),
    def("Hires steps", Txt2Img, Int, Some(Axis::HiresSteps)),
    def("CFG Scale", Both, Float, Some(Axis::CfgScale)),
    def("Image CFG Scale", Img2Img, Float, None),
    legend(
        def("Prompt S/R", Both, Text, Some(Axis::PromptSr)),
        Legend::Value,
    ),
    def("Prompt order", Both, Text, None),
    legend(
        choices(def("Sampler", Txt2Img, Text, Some(Axis::Sampler))),
        Legend::Value,
    ),
    choices(def("Hires sampler", Txt2Img, Text, None)),
    legend(
        choices(def("Sampler", Img2Img, Text, Some(Axis::Sampler))),
        Legend::Value,
    ),
    cost(
        legend(
            choices(def("Checkpoint name", Both, Text, Some(Axis::Checkpoint))),
            Legend::FileName,
        ),
        1.0,
    ),
    def("Negative Guidance minimum sigma", Both, Float, None),
    def("Sigma Churn", Both, Float, None),
    def("Sigma min", Both, Float, None),
    def("Sigma max", Both, Float, None),
    def("Sigma noise", Both, Float, None),
    choices(def("Schedule type", Both, Text, Some(Axis::ScheduleType))),
    def("Schedule min sigma", Both, Float, None),
    def("Schedule max sigma", Both, Float, None),
    def("Schedule rho", Both, Float, None),
    def("Skip Early CFG", Both, Float, None),
    def("Beta schedule alpha", Both, Float, None),
    def("Beta schedule beta", Both, Float, None),
    def("Eta", Both, Float, None),
    def("Clip skip", Both, Int, Some(Axis::ClipSkip)),
    def("Denoising", Both, Float, Some(Axis::Denoising)),
    def("Initial noise multiplier", Both, Float, None),
    def("Extra noise", Both, Float, None),
    choices(def(
        "Hires upscaler",
        Txt2Img,
        Text,
        Some(Axis::HiresUpscaler),
    )),
    def("Cond. Image Mask Weight", Img2Img, Float, None),
    cost(choices(def("VAE", Both, Text, None)), 0.7),
    choices(def("Styles", Both, Text, None)),
    cost(def("UniPC Order", Both, Int, None), 0.5),
    legend(def("Face restore", Both, Text, None), Legend::Value),
    def("Token merging ratio", Both, Float, None),
    def("Token merging ratio high-res", Both, Float, None),
    choices(def("Always discard next-to-last sigma", Both, Text, None)),
    choices(def("SGM noise multiplier", Both, Text, None)),
    cost(
        legend(
            choices(def("Refiner checkpoint", Both, Text, None)),
            Legend::FileName,
        ),
        1.0,
    ),
    def("Refiner switch at", Both, Float, None),
    choices(def("RNG source", Both, Text, None)),
    cost(choices(def("FP8 mode", Both, Text, None)), 0.9),
    def("Size", Both, Text, Some(Axis::Size)),
];

/// The axis labels of a tab, in A1111's order: `x_type` indexes this list.
pub fn axis_labels(mode: Mode) -> Vec<&'static str> {
    options(mode).map(|d| d.label).collect()
}

fn options(mode: Mode) -> impl Iterator<Item = &'static AxisDef> {
    AXES.iter().filter(move |d| match d.tab {
        Both => true,
        Txt2Img => mode == Mode::Txt2Img,
        Img2Img => mode == Mode::Img2Img,
    })
}

/// One value of an axis.
#[derive(Debug, Clone, PartialEq)]
pub enum AxisValue {
    /// Integer axes.
    Int(i64),
    /// Float axes.
    Float(f64),
    /// Text axes.
    Text(String),
}

impl AxisValue {
    fn int(&self) -> i64 {
        match self {
            AxisValue::Int(v) => *v,
            AxisValue::Float(v) => *v as i64,
            AxisValue::Text(_) => 0,
        }
    }

    fn float(&self) -> f64 {
        match self {
            AxisValue::Int(v) => *v as f64,
            AxisValue::Float(v) => *v,
            AxisValue::Text(_) => 0.0,
        }
    }

    fn text(&self) -> String {
        match self {
            AxisValue::Int(v) => v.to_string(),
            AxisValue::Float(v) => python_float(*v),
            AxisValue::Text(s) => s.clone(),
        }
    }
}

/// One axis: what it changes and its values.
#[derive(Debug, Clone)]
pub struct AxisSpec {
    /// What the axis changes.
    pub axis: Axis,
    /// A1111's label ("Steps").
    pub label: &'static str,
    /// The values, ranges expanded.
    pub values: Vec<AxisValue>,
    /// The values as given (recorded as `X Values` in the grid's infotext).
    pub text: String,
    cost: f32,
    legend: Legend,
}

impl AxisSpec {
    fn nothing() -> Self {
        Self {
            axis: Axis::Nothing,
            label: "Nothing",
            values: vec![AxisValue::Int(0)],
            text: String::new(),
            cost: 0.0,
            legend: Legend::Empty,
        }
    }

    /// The legend of value `v`.
    pub fn legend(&self, v: &AxisValue) -> String {
        match self.legend {
            Legend::WithLabel => format!("{}: {}", self.label, v.text()),
            Legend::Value => v.text(),
            Legend::FileName => {
                let t = v.text();
                t.rsplit(['/', '\\']).next().unwrap_or(&t).to_string()
            }
            Legend::Empty => String::new(),
        }
    }

    fn is_seed(&self) -> bool {
        matches!(self.axis, Axis::Seed | Axis::VarSeed)
    }
}

/// An X/Y/Z plot's arguments (A1111's positional `script_args`).
#[derive(Debug, Clone)]
pub struct XyzPlot {
    /// The X, Y and Z axes.
    pub axes: [AxisSpec; 3],
    /// Labels above columns and left of rows.
    pub draw_legend: bool,
    /// Return each cell's image after the grids.
    pub include_lone_images: bool,
    /// Return each Z value's grid after the main one.
    pub include_sub_grids: bool,
    /// Keep -1 seeds: each cell draws its own.
    pub no_fixed_seeds: bool,
    /// Add the X, Y, Z index to the seed.
    pub vary_seeds: [bool; 3],
    /// Pixels between cells.
    pub margin_size: u32,
    /// Read dropdown axes from the text values.
    pub csv_mode: bool,
    /// The request's seed is -1 and stays so (`no_fixed_seeds`): each cell draws its own.
    pub random_base_seed: bool,
}

/// A cell as planned: its place in the grid and its generation.
#[derive(Debug, Clone)]
pub struct PlannedCell {
    /// `ix + iy·nx + iz·nx·ny`: where its image goes.
    pub index: usize,
    /// Indices on the X, Y, Z axes.
    pub at: [usize; 3],
    /// The generation.
    pub cell: Cell,
}

const NAMES: [&str; 3] = ["X", "Y", "Z"];

fn parse_axis(a: &Args<'_>, k: usize, mode: Mode, csv_mode: bool) -> Result<AxisSpec, ScriptError> {
    let name = NAMES[k];
    let at = 3 * k;
    let opts: Vec<&AxisDef> = options(mode).collect();
    let default = if k == 0 { 1 } else { 0 };
    let d: &AxisDef = match a.args.get(at).filter(|v| !v.is_null()) {
        None => opts[default],
        Some(serde_json::Value::String(s)) => opts
            .iter()
            .find(|d| d.label.eq_ignore_ascii_case(s.trim()))
            .copied()
            .ok_or_else(|| {
                ScriptError(format!(
                    "script_args[{at}] ({name} type): {s:?} is not an axis of the {} X/Y/Z \
                     plot; axes: {}",
                    mode_name(mode),
                    axis_labels(mode).join(", ")
                ))
            })?,
        Some(_) => {
            let i = a.uint(at, &format!("{name} type"), 0, opts.len() as u64 - 1)?;
            opts[i as usize]
        }
    };
    let Some(axis) = d.axis else {
        return Err(ScriptError(format!(
            "script_args[{at}] ({name} type): the X/Y/Z plot axis {:?} is not supported by \
             sdkube",
            d.label
        )));
    };
    if axis == Axis::Nothing {
        return Ok(AxisSpec::nothing());
    }
    let text = a.string(at + 1, &format!("{name} values"), "")?;
    let dropdown = a.strings(at + 2, &format!("{name} values dropdown"))?;
    // A1111 reads a dropdown axis from its dropdown unless csv_mode; a client that sent the
    // values as text only gets them read from there.
    let (raw, text) = if d.choices && !csv_mode && !dropdown.is_empty() {
        (dropdown.clone(), csv_line(&dropdown))
    } else {
        (csv_values(&text), text)
    };
    let what = format!("{name} values ({})", d.label);
    let values: Vec<AxisValue> = match d.kind {
        Int => int_values(&what, &raw)?
            .into_iter()
            .map(AxisValue::Int)
            .collect(),
        Float => float_values(&what, &raw)?
            .into_iter()
            .map(AxisValue::Float)
            .collect(),
        Text => raw.into_iter().map(AxisValue::Text).collect(),
    };
    if values.is_empty() {
        return Err(ScriptError(format!("{what}: no values given")));
    }
    for v in &values {
        check_value(&what, axis, v)?;
    }
    Ok(AxisSpec {
        axis,
        label: d.label,
        values,
        text,
        cost: d.cost,
        legend: d.legend,
    })
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Txt2Img => "txt2img",
        Mode::Img2Img => "img2img",
    }
}

/// `WxH` as A1111's `apply_size` reads it.
fn parse_size(s: &str) -> Option<(usize, usize)> {
    let (w, h) = s.split_once('x')?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

fn check_value(what: &str, axis: Axis, v: &AxisValue) -> Result<(), ScriptError> {
    let bad = |why: &str| Err(ScriptError(format!("{what}: {} {why}", v.text())));
    match axis {
        Axis::Steps if v.int() < 1 => bad("is not a step count (1 or more)"),
        Axis::HiresSteps if v.int() < 0 => bad("is not a step count"),
        Axis::ClipSkip if !(1..=12).contains(&v.int()) => bad("is not a clip skip (1 to 12)"),
        Axis::Denoising | Axis::VarStrength if !(0.0..=1.0).contains(&v.float()) => {
            bad("is not between 0 and 1")
        }
        Axis::Size => match parse_size(&v.text()) {
            Some((w, h)) if w > 0 && h > 0 => Ok(()),
            _ => bad("is not a size WIDTHxHEIGHT"),
        },
        Axis::Sampler | Axis::Checkpoint | Axis::ScheduleType | Axis::HiresUpscaler
            if v.text().is_empty() =>
        {
            bad("is empty")
        }
        _ => Ok(()),
    }
}

impl XyzPlot {
    /// Parses A1111's `script_args`: `[x_type, x_values, x_values_dropdown, y_type, …,
    /// z_values_dropdown, draw_legend, include_lone_images, include_sub_grids,
    /// no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode]`;
    /// missing ones take A1111's defaults (X Seed, Y and Z Nothing, legend on).
    pub fn from_args(args: &[serde_json::Value], mode: Mode) -> Result<Self, ScriptError> {
        let a = Args::new("X/Y/Z plot", args, 18)?;
        let csv_mode = a.bool(17, "csv_mode", false)?;
        let axes = [
            parse_axis(&a, 0, mode, csv_mode)?,
            parse_axis(&a, 1, mode, csv_mode)?,
            parse_axis(&a, 2, mode, csv_mode)?,
        ];
        let plot = Self {
            axes,
            draw_legend: a.bool(9, "draw_legend", true)?,
            include_lone_images: a.bool(10, "include_lone_images", false)?,
            include_sub_grids: a.bool(11, "include_sub_grids", false)?,
            no_fixed_seeds: a.bool(12, "no_fixed_seeds", false)?,
            vary_seeds: [
                a.bool(13, "vary_seeds_x", false)?,
                a.bool(14, "vary_seeds_y", false)?,
                a.bool(15, "vary_seeds_z", false)?,
            ],
            margin_size: a.uint(16, "margin_size", 0, 500)? as u32,
            csv_mode,
            random_base_seed: false,
        };
        let cells = plot.cell_count();
        if cells > MAX_CELLS {
            return Err(ScriptError(format!(
                "the X/Y/Z plot asks for {cells} images ({} × {} × {}), over the limit of \
                 {MAX_CELLS}",
                plot.axes[0].values.len(),
                plot.axes[1].values.len(),
                plot.axes[2].values.len()
            )));
        }
        Ok(plot)
    }

    /// Cells in all.
    pub fn cell_count(&self) -> usize {
        self.axes.iter().map(|a| a.values.len()).product()
    }

    /// The plot with -1 seed values drawn once (unless `no_fixed_seeds`), as A1111 fixes
    /// them before the first cell: the legend then shows the seeds used.
    pub fn with_fixed_seeds(&self, draw_seed: &mut dyn FnMut() -> u64) -> Self {
        let mut out = self.clone();
        if self.no_fixed_seeds {
            return out;
        }
        for axis in out.axes.iter_mut().filter(|a| a.is_seed()) {
            for v in &mut axis.values {
                if v.int() == -1 {
                    *v = AxisValue::Int(draw_seed() as i64);
                }
            }
        }
        out
    }

    /// A1111's loop order: the costliest axis outermost (then the next), else Z, Y, X.
    fn loop_order(&self) -> [usize; 3] {
        let c: Vec<f32> = self.axes.iter().map(|a| a.cost).collect();
        let (first, second) = if c[0] > c[1] && c[0] > c[2] {
            (0, if c[1] > c[2] { 1 } else { 2 })
        } else if c[1] > c[0] && c[1] > c[2] {
            (1, if c[0] > c[2] { 0 } else { 2 })
        } else if c[2] > c[0] && c[2] > c[1] {
            (2, if c[0] > c[1] { 0 } else { 1 })
        } else {
            (2, 1)
        };
        let third = 3 - first - second;
        [first, second, third]
    }

    /// The cells in the order they run (outermost axis first), each with its place.
    pub fn cells(
        &self,
        base: &Cell,
        draw_seed: &mut dyn FnMut() -> u64,
    ) -> Result<Vec<PlannedCell>, ScriptError> {
        let n: Vec<usize> = self.axes.iter().map(|a| a.values.len()).collect();
        let order = self.loop_order();
        let mut out = Vec::with_capacity(self.cell_count());
        for i0 in 0..n[order[0]] {
            for i1 in 0..n[order[1]] {
                for i2 in 0..n[order[2]] {
                    let mut at = [0; 3];
                    at[order[0]] = i0;
                    at[order[1]] = i1;
                    at[order[2]] = i2;
                    let cell = self.cell_at(base, at, draw_seed)?;
                    out.push(PlannedCell {
                        index: at[0] + at[1] * n[0] + at[2] * n[0] * n[1],
                        at,
                        cell,
                    });
                }
            }
        }
        Ok(out)
    }

    fn cell_at(
        &self,
        base: &Cell,
        at: [usize; 3],
        draw_seed: &mut dyn FnMut() -> u64,
    ) -> Result<Cell, ScriptError> {
        let mut cell = base.clone();
        cell.request.batch_size = 1;
        let mut seed: i64 = if self.random_base_seed {
            -1
        } else {
            base.request.seed as i64
        };
        for (k, axis) in self.axes.iter().enumerate() {
            let v = &axis.values[at[k]];
            if axis.axis == Axis::Seed {
                seed = v.int();
            }
            apply(&mut cell, axis, v)?;
        }
        if seed < 0 {
            seed = draw_seed() as i64;
        }
        // A1111's "vary seeds": the seed counts up across the varied axes.
        let n: Vec<i64> = self.axes.iter().map(|a| a.values.len() as i64).collect();
        let xdim = if self.vary_seeds[0] { n[0] } else { 1 };
        let ydim = if self.vary_seeds[1] { n[1] } else { 1 };
        if self.vary_seeds[0] {
            seed += at[0] as i64;
        }
        if self.vary_seeds[1] {
            seed += at[1] as i64 * xdim;
        }
        if self.vary_seeds[2] {
            seed += at[2] as i64 * xdim * ydim;
        }
        cell.request.seed = seed as u64;
        if cell.request.subseed_strength != 0.0 && (cell.request.subseed as i64) < 0 {
            cell.request.subseed = draw_seed();
        }
        Ok(cell)
    }

    /// The fields A1111 adds to a grid's infotext for axes `ks`.
    fn grid_fields(&self, ks: &[usize]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for &k in ks {
            let a = &self.axes[k];
            if a.axis == Axis::Nothing {
                continue;
            }
            out.push((format!("{} Type", NAMES[k]), a.label.to_string()));
            out.push((format!("{} Values", NAMES[k]), a.text.clone()));
            if a.is_seed() && !self.no_fixed_seeds {
                let fixed: Vec<String> = a.values.iter().map(AxisValue::text).collect();
                out.push((format!("Fixed {} Values", NAMES[k]), fixed.join(", ")));
            }
        }
        out
    }

    /// Runs every cell through `runner` and composes A1111's output.
    pub fn run<R: CellRunner>(
        &self,
        base: &Cell,
        runner: &mut R,
        draw_seed: &mut dyn FnMut() -> u64,
    ) -> Result<ScriptOutput, R::Error> {
        let plot = self.with_fixed_seeds(draw_seed);
        let planned = plot.cells(base, draw_seed)?;
        let mut results: Vec<Option<(CellImage, String, String)>> = vec![None; planned.len()];
        for p in &planned {
            let image = runner
                .run_cell(&p.cell)?
                .unwrap_or_else(|| blank_like(&p.cell, p.cell.request.seed));
            let r = &p.cell.request;
            results[p.index] = Some((image, r.prompt.clone(), r.negative_prompt.clone()));
        }
        let cells: Vec<(CellImage, String, String)> = results.into_iter().flatten().collect();
        Ok(plot.compose(cells))
    }

    /// The grids and lists from the cells' results, in grid order (x fastest).
    fn compose(&self, cells: Vec<(CellImage, String, String)>) -> ScriptOutput {
        let [nx, ny, nz] = [0, 1, 2].map(|k| self.axes[k].values.len());
        let labels = |k: usize| -> Vec<Vec<Annotation>> {
            self.axes[k]
                .values
                .iter()
                .map(|v| vec![Annotation::new(self.axes[k].legend(v))])
                .collect()
        };
        let mut sub_grids = Vec::with_capacity(nz);
        for iz in 0..nz {
            let slice = &cells[iz * nx * ny..(iz + 1) * nx * ny];
            let images: Vec<_> = slice.iter().map(|c| c.0.image.clone()).collect();
            let mut grid = image_grid(&images, ny);
            if self.draw_legend {
                let w = images.iter().map(|i| i.width()).max().unwrap_or(1);
                let h = images.iter().map(|i| i.height()).max().unwrap_or(1);
                grid = draw_annotations(&grid, w, h, &labels(0), &labels(1), self.margin_size);
            }
            let first = &slice[0].0;
            let mut info = first.parameters.clone();
            let mut fields = vec![("Script".to_string(), "X/Y/Z plot".to_string())];
            fields.extend(self.grid_fields(&[0, 1]));
            add_fields(&mut info, &fields);
            sub_grids.push(ScriptImage {
                image: grid,
                infotext: info,
                seed: first.seed,
                grid: true,
            });
        }
        let subs: Vec<_> = sub_grids.iter().map(|g| g.image.clone()).collect();
        let mut main = image_grid(&subs, 1);
        if self.draw_legend {
            let w = subs.iter().map(|i| i.width()).max().unwrap_or(1);
            let h = subs.iter().map(|i| i.height()).max().unwrap_or(1);
            main = draw_annotations(&main, w, h, &labels(2), &[vec![Annotation::new("")]], 0);
        }
        let mut main_info = sub_grids[0].infotext.clone();
        add_fields(&mut main_info, &self.grid_fields(&[2]));
        let mut out = ScriptOutput {
            index_of_first_image: 1,
            ..ScriptOutput::default()
        };
        out.images.push(ScriptImage {
            image: main,
            infotext: main_info,
            seed: sub_grids[0].seed,
            grid: true,
        });
        if self.include_sub_grids {
            for (iz, g) in sub_grids.into_iter().enumerate() {
                let (first, prompt, negative) = &cells[iz * nx * ny];
                out.all_prompts.push(prompt.clone());
                out.all_negative_prompts.push(negative.clone());
                out.all_seeds.push(first.seed);
                out.images.push(g);
            }
        }
        for (image, prompt, negative) in cells {
            out.all_prompts.push(prompt);
            out.all_negative_prompts.push(negative);
            out.all_seeds.push(image.seed);
            if self.include_lone_images {
                out.images.push(ScriptImage {
                    image: image.image,
                    infotext: image.parameters,
                    seed: image.seed,
                    grid: false,
                });
            }
        }
        out
    }
}

/// Sets one axis's value on a cell, as A1111's `apply` functions do.
fn apply(cell: &mut Cell, axis: &AxisSpec, v: &AxisValue) -> Result<(), ScriptError> {
    let r = &mut cell.request;
    match axis.axis {
        Axis::Nothing | Axis::Seed => {}
        Axis::VarSeed => r.subseed = v.int() as u64,
        Axis::VarStrength => r.subseed_strength = v.float(),
        Axis::Steps => r.steps = v.int() as usize,
        Axis::HiresSteps => {
            if let Some(h) = &mut cell.hires {
                h.steps = v.int() as usize;
            }
        }
        Axis::CfgScale => r.cfg_scale = v.float(),
        Axis::PromptSr => {
            // A1111 replaces every occurrence of the first value, in both prompts.
            let from = axis.values[0].text();
            if !r.prompt.contains(&from) && !r.negative_prompt.contains(&from) {
                return Err(ScriptError(format!(
                    "Prompt S/R did not find {from} in prompt or negative prompt."
                )));
            }
            let to = v.text();
            r.prompt = r.prompt.replace(&from, &to);
            r.negative_prompt = r.negative_prompt.replace(&from, &to);
        }
        Axis::Sampler => r.sampler = v.text(),
        Axis::Checkpoint => cell.checkpoint = Some(v.text()),
        Axis::ScheduleType => r.scheduler = Some(v.text()),
        Axis::ClipSkip => r.clip_skip = v.int() as usize,
        Axis::Denoising => {
            r.strength = v.float();
            if let Some(h) = &mut cell.hires {
                h.denoising_strength = v.float();
            }
        }
        Axis::HiresUpscaler => {
            if let Some(h) = &mut cell.hires {
                h.upscaler = v.text();
            }
        }
        Axis::Size => {
            let (w, h) = parse_size(&v.text()).unwrap_or((r.width, r.height));
            // The hires fix keeps its scale to the first pass.
            if let Some(hr) = &mut cell.hires {
                hr.width = hr.width * w / r.width.max(1) / 8 * 8;
                hr.height = hr.height * h / r.height.max(1) / 8 * 8;
            }
            r.width = w;
            r.height = h;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "xyz_tests.rs"]
mod tests;
