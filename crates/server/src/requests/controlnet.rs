//! ControlNet units as sd-webui-controlnet's API takes them:
//! `alwayson_scripts: {"controlnet": {"args": [unit, …]}}` on txt2img and img2img. A unit is
//! checked when the job is submitted (its image decodes, its preprocessor and sliders exist,
//! its model is in `--controlnet-dirs`); the worker runs the preprocessor and hands the
//! engine a [`ControlUnit`].

use std::path::Path;

use candle_core::{DType, Device};
use image::{DynamicImage, GrayImage};
use sdkube_pipeline::control::{ControlMode, ControlNetLibrary, ControlUnit, ResizeMode};
use sdkube_preprocess::{Annotators, DepthAnythingDetector, Params};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::decode_image;
use crate::error::ApiError;
use crate::model::ModelSources;

/// The `alwayson_scripts` key of ControlNet (A1111 matches script names without case).
pub fn is_controlnet_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("controlnet")
}

/// One unit as the extension's API sends it (`ControlNetUnit`'s fields; others are ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct UnitArgs {
    enabled: bool,
    /// Base64 image, or `{"image": …, "mask": …}` as the extension's UI sends it.
    image: Option<Value>,
    input_image: Option<Value>,
    mask: Option<String>,
    mask_image: Option<String>,
    module: String,
    model: String,
    weight: f64,
    resize_mode: Value,
    processor_res: f64,
    threshold_a: f64,
    threshold_b: f64,
    guidance_start: f64,
    guidance_end: f64,
    control_mode: Value,
    pixel_perfect: bool,
    /// Older clients' name for "ControlNet is more important".
    guess_mode: bool,
    /// Append the detected map to the response's images (the extension's default).
    save_detected_map: bool,
}

impl Default for UnitArgs {
    fn default() -> Self {
        Self {
            enabled: true,
            image: None,
            input_image: None,
            mask: None,
            mask_image: None,
            module: "none".into(),
            model: "None".into(),
            weight: 1.0,
            resize_mode: Value::from("Crop and Resize"),
            processor_res: -1.0,
            threshold_a: -1.0,
            threshold_b: -1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            control_mode: Value::from("Balanced"),
            pixel_perfect: false,
            guess_mode: false,
            save_detected_map: true,
        }
    }
}

/// A checked unit: its decoded image, its preprocessor, and the engine's unit to fill in.
pub struct ControlJob {
    /// The unit before preprocessing (its image is replaced by the detected map).
    pub unit: ControlUnit,
    /// The input image.
    pub image: DynamicImage,
    /// The inpaint modules' mask.
    pub mask: Option<GrayImage>,
    /// The preprocessor.
    pub module: String,
    /// Its sliders.
    pub params: Params,
    /// Whether the detected map joins the job's images after the generated ones.
    pub keep_map: bool,
}

impl ControlJob {
    /// Runs the preprocessor for a `width` × `height` generation: the unit the engine takes.
    pub fn detect(&self, annotators: &Annotators) -> Result<ControlUnit, ApiError> {
        let detected = sdkube_preprocess::detect(
            &self.module,
            &self.image,
            self.mask.as_ref(),
            &self.params,
            annotators,
        )
        .map_err(|e| ApiError::bad_request(format!("ControlNet: {e}")))?;
        // The inpaint preprocessors answer the image with the mask in its alpha
        // (255 − mask/2): the ControlNet sees those pixels as −1.
        let mask = match &detected {
            DynamicImage::ImageRgba8(rgba) => {
                Some(GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                    let alpha = rgba.get_pixel(x, y).0[3];
                    image::Luma([(255 - alpha).saturating_mul(2)])
                }))
            }
            _ => None,
        };
        Ok(ControlUnit {
            image: detected.to_rgb8(),
            mask,
            ..self.unit.clone()
        })
    }
}

/// A string or an index, as the extension accepts enums.
fn enum_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The units of a request's `alwayson_scripts`, checked; `warnings` gets the units skipped
/// as the extension skips them (disabled, or no model). `library` is `None` where this
/// process has no ControlNet folders (the `api` role): the worker checks the model then.
pub fn units(
    scripts: &Map<String, Value>,
    size: (usize, usize),
    library: Option<&ControlNetLibrary>,
    warnings: &mut Vec<String>,
) -> Result<Vec<ControlJob>, ApiError> {
    let Some((_, script)) = scripts.iter().find(|(k, _)| is_controlnet_key(k)) else {
        return Ok(Vec::new());
    };
    let bad = |msg: String| ApiError::bad_request(format!("alwayson_scripts.controlnet: {msg}"));
    let args = match script {
        Value::Object(m) => m.get("args").cloned().unwrap_or(Value::Array(Vec::new())),
        Value::Array(a) => Value::Array(a.clone()),
        Value::Null => return Ok(Vec::new()),
        _ => return Err(bad("expected {\"args\": [unit, …]}".into())),
    };
    let Value::Array(args) = args else {
        return Err(bad("`args` must be a list of units".into()));
    };
    let mut jobs = Vec::new();
    for (i, arg) in args.into_iter().enumerate() {
        let a: UnitArgs = serde_json::from_value(arg).map_err(|e| bad(format!("unit {i}: {e}")))?;
        if !a.enabled {
            continue;
        }
        if a.model.is_empty() || a.model == "None" {
            warnings.push(format!(
                "ControlNet unit {i}: no model, the unit is not used"
            ));
            continue;
        }
        let what = format!("alwayson_scripts.controlnet unit {i}");
        let (image_b64, mask_b64) = match a.image.as_ref().or(a.input_image.as_ref()) {
            Some(Value::String(s)) => (s.clone(), a.mask.clone().or(a.mask_image.clone())),
            Some(Value::Object(m)) => (
                m.get("image")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("unit {i}: `image.image` must be base64")))?
                    .to_string(),
                m.get("mask").and_then(Value::as_str).map(str::to_string),
            ),
            _ => {
                return Err(bad(format!(
                    "unit {i}: no image (`image` or `input_image`)"
                )))
            }
        };
        let image = decode_image(&format!("{what} image"), &image_b64)?;
        let mask = mask_b64
            .map(|m| decode_image(&format!("{what} mask"), &m).map(|m| m.to_luma8()))
            .transpose()?;
        let module =
            sdkube_preprocess::find(&a.module).map_err(|e| bad(format!("unit {i}: {e}")))?;
        let resize_mode = ResizeMode::parse(&enum_text(&a.resize_mode))
            .map_err(|e| bad(format!("unit {i}: {e}")))?;
        let mode = match a.guess_mode {
            true => ControlMode::ControlNetMoreImportant,
            false => ControlMode::parse(&enum_text(&a.control_mode))
                .map_err(|e| bad(format!("unit {i}: {e}")))?,
        };
        let mut params = Params {
            processor_res: Some(a.processor_res),
            threshold_a: Some(a.threshold_a),
            threshold_b: Some(a.threshold_b),
        };
        if a.pixel_perfect {
            params.processor_res = Some(f64::from(sdkube_preprocess::pixel_perfect_resolution(
                image.width(),
                image.height(),
                size.0 as u32,
                size.1 as u32,
                resize_mode,
            )));
        }
        module
            .resolve(&params)
            .map_err(|e| bad(format!("unit {i}: {e}")))?;
        if module.requires_mask && mask.is_none() && !image.color().has_alpha() {
            return Err(bad(format!("unit {i}: {} needs a mask", module.name)));
        }
        let model = match library {
            Some(lib) => lib
                .find(&a.model)
                .map_err(|e| bad(format!("unit {i}: {e}")))?
                .title(),
            None => a.model.clone(),
        };
        let unit = ControlUnit {
            weight: a.weight,
            guidance_start: a.guidance_start,
            guidance_end: a.guidance_end,
            mode,
            resize_mode,
            ..ControlUnit::new(&model, image::RgbImage::new(1, 1))
        };
        unit.check().map_err(|e| bad(format!("unit {i}: {e}")))?;
        jobs.push(ControlJob {
            unit,
            image,
            mask,
            module: module.name.to_string(),
            params,
            keep_map: a.save_detected_map,
        });
    }
    Ok(jobs)
}

/// Loads into `into` the networks the preprocessors `modules` need and it lacks, from the
/// model store (`sdkube fetch <name>` puts them there).
pub fn load_annotators<'m>(
    store: &Path,
    modules: impl Iterator<Item = &'m str>,
    device: &Device,
    into: &mut Annotators,
) -> Result<(), ApiError> {
    for name in modules {
        let module =
            sdkube_preprocess::find(name).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let Some(weights) = module.weights else {
            continue;
        };
        if into.depth_anything.is_some() {
            continue;
        }
        let missing = || {
            ApiError::unavailable(format!(
                "the ControlNet preprocessor {} needs its weights: run `sdkube fetch {weights}`",
                module.name
            ))
        };
        let path = sdkube_store::Store::open(store)
            .ok()
            .and_then(|s| s.model_path(weights))
            .ok_or_else(missing)?;
        let file = match path.is_dir() {
            true => path.join("model.safetensors"),
            false => path,
        };
        let cfg = sdkube_preprocess::depth_anything::Config::small();
        let detector = DepthAnythingDetector::load(&file, &cfg, device, DType::F32)
            .map_err(|e| ApiError::internal(format!("{}: {e}", module.name)))?;
        into.depth_anything = Some(detector);
    }
    Ok(())
}

/// The ControlNets a unit may name: the files and diffusers folders of `dirs`, and the model
/// store's catalog entries of kind `controlnet` that are fetched (by their catalog name).
pub fn library(dirs: &[std::path::PathBuf], sources: &ModelSources) -> ControlNetLibrary {
    ControlNetLibrary::with_files(dirs.to_vec(), sources.fetched("controlnet"))
}
