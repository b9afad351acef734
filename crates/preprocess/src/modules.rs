//! The preprocessor table: sd-webui-controlnet's module names, UI labels (the API's
//! `alias_names`), sliders and list order, as `/controlnet/module_list` reports them, and how a
//! unit's `processor_res`, `threshold_a` and `threshold_b` resolve against them.

use serde::Serialize;

use crate::Error;

/// One slider of a module, as `module_detail` lists it (`name`, `value`, `min`, `max`, `step`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slider {
    /// The UI label ("Resolution", "Low Threshold", …).
    pub name: &'static str,
    /// The default value.
    pub value: f64,
    /// The smallest accepted value.
    #[serde(rename = "min")]
    pub minimum: f64,
    /// The largest accepted value.
    #[serde(rename = "max")]
    pub maximum: f64,
    /// The UI step.
    pub step: f64,
}

/// What a module does with an image; [`crate::detect`] dispatches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `none`: the image as it is.
    None,
    /// `invert`: `255 − image`.
    Invert,
    /// `canny`: `cv2.Canny` edges.
    Canny,
    /// `threshold`: white where every channel is above the level.
    Threshold,
    /// `blur_gaussian`: `cv2.GaussianBlur`.
    BlurGaussian,
    /// `tile_resample`: shrunk by the down-sampling rate.
    TileResample,
    /// `scribble_xdog`: thresholded difference of Gaussians.
    ScribbleXdog,
    /// `inpaint`, `inpaint_only`: the image with the mask in its alpha channel.
    Inpaint,
    /// `depth_anything`: the Depth Anything network's relative depth.
    DepthAnything,
}

/// A preprocessor as the extension lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Module {
    /// The internal name (`module_list`; what a unit's `module` usually says).
    pub name: &'static str,
    /// The UI label (`module_list?alias_names=true`); a unit's `module` may say this too.
    pub label: &'static str,
    /// `module_detail`'s `model_free`: whether the unit runs without a ControlNet model
    /// (false for all of these).
    pub model_free: bool,
    /// The visible sliders, in order: the resolution (when shown), then threshold a and b.
    pub sliders: Vec<Slider>,
    /// What it does.
    #[serde(skip)]
    pub kind: Kind,
    /// Whether it needs the unit's mask (the inpaint modules).
    #[serde(skip)]
    pub requires_mask: bool,
    /// The catalog model whose weights it needs (`sdkube fetch NAME`), for learned modules.
    #[serde(skip)]
    pub weights: Option<&'static str>,
    /// The extension's `sorting_priority` (higher first; "none" always first).
    #[serde(skip)]
    priority: u32,
    #[serde(skip)]
    has_resolution: bool,
}

const RESOLUTION: Slider = Slider {
    name: "Resolution",
    value: 512.0,
    minimum: 64.0,
    maximum: 2048.0,
    step: 8.0,
};

/// A slider of the extension's `PreprocessorParameter`, whose step defaults to 0.01.
const fn slider(name: &'static str, value: f64, minimum: f64, maximum: f64, step: f64) -> Slider {
    Slider {
        name,
        value,
        minimum,
        maximum,
        step,
    }
}

fn module(
    name: &'static str,
    label: &'static str,
    kind: Kind,
    priority: u32,
    has_resolution: bool,
    thresholds: &[Slider],
) -> Module {
    let mut sliders = Vec::new();
    if has_resolution {
        sliders.push(RESOLUTION);
    }
    sliders.extend_from_slice(thresholds);
    Module {
        name,
        label,
        model_free: false,
        sliders,
        kind,
        requires_mask: kind == Kind::Inpaint,
        weights: (kind == Kind::DepthAnything).then_some(crate::depth::CATALOG_NAME),
        priority,
        has_resolution,
    }
}

/// Every module, in the extension's list order: "none" first, then by priority and label,
/// descending (its `get_sorted_preprocessors`).
pub fn modules() -> Vec<Module> {
    let mut all = vec![
        module("none", "none", Kind::None, 10, true, &[]),
        module(
            "canny",
            "canny",
            Kind::Canny,
            100,
            true,
            &[
                slider("Low Threshold", 100.0, 1.0, 255.0, 1.0),
                slider("High Threshold", 200.0, 1.0, 255.0, 1.0),
            ],
        ),
        module(
            "invert",
            "invert (from white bg & black line)",
            Kind::Invert,
            20,
            false,
            &[],
        ),
        module(
            "blur_gaussian",
            "blur_gaussian",
            Kind::BlurGaussian,
            0,
            true,
            &[slider("Sigma", 9.0, 0.01, 64.0, 0.01)],
        ),
        module(
            "scribble_xdog",
            "scribble_xdog",
            Kind::ScribbleXdog,
            0,
            true,
            &[slider("XDoG Threshold", 32.0, 1.0, 64.0, 0.01)],
        ),
        module(
            "threshold",
            "threshold",
            Kind::Threshold,
            0,
            true,
            &[slider("Binarization Threshold", 127.0, 0.0, 255.0, 0.01)],
        ),
        module(
            "tile_resample",
            "tile_resample",
            Kind::TileResample,
            100,
            true,
            &[slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)],
        ),
        module(
            "inpaint",
            "inpaint_global_harmonious",
            Kind::Inpaint,
            0,
            false,
            &[],
        ),
        module(
            "inpaint_only",
            "inpaint_only",
            Kind::Inpaint,
            100,
            false,
            &[],
        ),
        module(
            "depth_anything",
            "depth_anything",
            Kind::DepthAnything,
            0,
            true,
            &[],
        ),
    ];
    all.sort_by(|a, b| {
        let first = |m: &Module| m.name == "none";
        first(b)
            .cmp(&first(a))
            .then(b.priority.cmp(&a.priority))
            .then(b.label.cmp(a.label))
    });
    all
}

/// The module a unit's `module` names: its internal name or its UI label, as the extension
/// looks them up. Unknown names are an error listing the known ones.
pub fn find(name: &str) -> Result<Module, Error> {
    let all = modules();
    let known = all.iter().map(|m| m.name).collect::<Vec<_>>().join(", ");
    all.into_iter()
        .find(|m| m.label == name || m.name == name)
        .ok_or_else(|| Error::UnknownModule {
            name: name.to_owned(),
            known,
        })
}

/// A unit's preprocessor settings as the API sends them. `None` or −1 (the extension's "unset")
/// means the module's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Params {
    /// `processor_res`: the short side the image is resized to before detection.
    pub processor_res: Option<f64>,
    /// `threshold_a`: the module's first slider.
    pub threshold_a: Option<f64>,
    /// `threshold_b`: the module's second slider.
    pub threshold_b: Option<f64>,
}

/// Settings resolved against a module: defaults filled in, ranges checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    /// The processor resolution (512 where the module shows no resolution slider).
    pub resolution: f64,
    /// Threshold a (0 where the module has none).
    pub a: f64,
    /// Threshold b (0 where the module has none).
    pub b: f64,
}

impl Module {
    fn threshold_sliders(&self) -> &[Slider] {
        &self.sliders[usize::from(self.has_resolution)..]
    }

    /// Fills in defaults and checks ranges. The extension silently replaces an out-of-range
    /// value with the default; here it is an error naming the value, the slider and its range
    /// (−1 still means "default"). Values for sliders the module does not show are ignored.
    pub fn resolve(&self, params: &Params) -> Result<Resolved, Error> {
        let pick = |value: Option<f64>, slider: Option<&Slider>, field: &'static str| {
            let Some(s) = slider else { return Ok(0.0) };
            match value {
                None => Ok(s.value),
                Some(-1.0) => Ok(s.value),
                Some(v) if v.is_finite() && v >= s.minimum && v <= s.maximum => Ok(v),
                Some(v) => Err(Error::OutOfRange {
                    module: self.name,
                    field,
                    slider: s.name,
                    value: v,
                    minimum: s.minimum,
                    maximum: s.maximum,
                }),
            }
        };
        let resolution = if self.has_resolution {
            pick(params.processor_res, Some(&RESOLUTION), "processor_res")?
        } else {
            RESOLUTION.value
        };
        let t = self.threshold_sliders();
        Ok(Resolved {
            resolution,
            a: pick(params.threshold_a, t.first(), "threshold_a")?,
            b: pick(params.threshold_b, t.get(1), "threshold_b")?,
        })
    }
}

/// How a unit's image will be fitted to the generation size (A1111's `resize_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeMode {
    /// "Just Resize": stretched to the target.
    Resize,
    /// "Crop and Resize" (inner fit): scaled to cover the target, then cropped.
    #[default]
    CropAndResize,
    /// "Resize and Fill" (outer fit): scaled to fit inside the target, then padded.
    ResizeAndFill,
}

impl ResizeMode {
    /// The extension's names ("Just Resize", "Crop and Resize", "Resize and Fill", and its
    /// older "Envelope (Outer Fit)", "Scale to Fit (Inner Fit)" / "Inner Fit (Scale to Fit)",
    /// "Outer Fit (Shrink to Fit)") or their indices 0–2.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "Just Resize" | "Envelope (Outer Fit)" | "0" => Ok(Self::Resize),
            "Crop and Resize" | "Scale to Fit (Inner Fit)" | "Inner Fit (Scale to Fit)" | "1" => {
                Ok(Self::CropAndResize)
            }
            "Resize and Fill" | "Outer Fit (Shrink to Fit)" | "2" => Ok(Self::ResizeAndFill),
            other => Err(format!(
                "unknown resize_mode {other:?}: use \"Just Resize\", \"Crop and Resize\" or \
                 \"Resize and Fill\" (or 0, 1, 2)"
            )),
        }
    }

    /// The extension's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Resize => "Just Resize",
            Self::CropAndResize => "Crop and Resize",
            Self::ResizeAndFill => "Resize and Fill",
        }
    }
}

/// The extension's `pixel_perfect_resolution`: the processor resolution at which the detected
/// map needs no further scaling for a `target_width×target_height` generation.
pub fn pixel_perfect_resolution(
    width: u32,
    height: u32,
    target_width: u32,
    target_height: u32,
    mode: ResizeMode,
) -> u32 {
    let k0 = f64::from(target_height) / f64::from(height);
    let k1 = f64::from(target_width) / f64::from(width);
    let k = if mode == ResizeMode::ResizeAndFill {
        k0.min(k1)
    } else {
        k0.max(k1)
    };
    (k * f64::from(width.min(height))).round_ties_even() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_order_is_the_extensions() {
        let names: Vec<_> = modules().iter().map(|m| m.name).collect();
        assert_eq!(
            names,
            [
                "none",
                "tile_resample",
                "inpaint_only",
                "canny",
                "invert",
                "threshold",
                "scribble_xdog",
                "inpaint",
                "depth_anything",
                "blur_gaussian"
            ]
        );
    }

    #[test]
    fn labels_and_names_both_find_a_module() {
        assert_eq!(find("inpaint_global_harmonious").unwrap().name, "inpaint");
        assert_eq!(
            find("invert (from white bg & black line)").unwrap().name,
            "invert"
        );
        let err = find("hed").unwrap_err().to_string();
        assert!(err.contains("hed") && err.contains("canny, "), "{err}");
    }

    #[test]
    fn defaults_fill_in_and_out_of_range_values_are_named() {
        let canny = find("canny").unwrap();
        let r = canny
            .resolve(&Params {
                processor_res: Some(-1.0),
                threshold_a: None,
                threshold_b: Some(150.0),
            })
            .unwrap();
        assert_eq!((r.resolution, r.a, r.b), (512.0, 100.0, 150.0));
        let err = canny
            .resolve(&Params {
                threshold_a: Some(300.0),
                ..Params::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("threshold_a") && err.contains("Low Threshold") && err.contains("255"),
            "{err}"
        );
        // invert shows no slider: whatever is sent is ignored
        assert!(find("invert")
            .unwrap()
            .resolve(&Params {
                processor_res: Some(5.0),
                threshold_a: Some(1e9),
                threshold_b: None
            })
            .is_ok());
    }

    #[test]
    fn module_detail_json_has_the_extensions_slider_fields() {
        let json = serde_json::to_value(find("canny").unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "canny",
                "label": "canny",
                "model_free": false,
                "sliders": [
                    {"name": "Resolution", "value": 512.0, "min": 64.0, "max": 2048.0, "step": 8.0},
                    {"name": "Low Threshold", "value": 100.0, "min": 1.0, "max": 255.0, "step": 1.0},
                    {"name": "High Threshold", "value": 200.0, "min": 1.0, "max": 255.0, "step": 1.0}
                ]
            })
        );
    }

    #[test]
    fn pixel_perfect_matches_the_extensions_formula() {
        // 1024×768 image for a 512×512 generation: inner fit scales by the larger factor
        assert_eq!(
            pixel_perfect_resolution(1024, 768, 512, 512, ResizeMode::CropAndResize),
            512
        );
        assert_eq!(
            pixel_perfect_resolution(1024, 768, 512, 512, ResizeMode::ResizeAndFill),
            384
        );
        assert_eq!(
            pixel_perfect_resolution(300, 200, 768, 512, ResizeMode::Resize),
            512
        );
    }
}
