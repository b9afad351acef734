//! What a job asks the device to do, already parsed and checked by the API layer.

use image::DynamicImage;
use sdkube_pipeline::Request;

/// The work of one job.
#[allow(clippy::large_enum_variant)] // one per job, never in bulk
pub enum Work {
    Generate(GenerateWork),
    Extras(ExtrasWork),
    /// A1111's "Create embedding": new vectors from an init text, saved into the folder.
    CreateEmbedding(CreateEmbeddingWork),
    /// Textual-inversion training of an existing embedding.
    TrainEmbedding(sdkube_pipeline::train::TrainOptions),
}

pub struct CreateEmbeddingWork {
    pub name: String,
    pub init_text: String,
    pub vectors: usize,
    pub overwrite: bool,
    pub out: std::path::PathBuf,
}

/// txt2img / img2img / inpainting, with A1111's batch count and post-processing.
pub struct GenerateWork {
    pub request: Request,
    /// A1111's `n_iter`: batches run one after the other; iteration i uses seed + i·batch.
    pub n_iter: usize,
    pub restore_faces: bool,
    pub hires: Option<HiresFix>,
    /// Write the images into the outputs folder (the UI's jobs do; A1111's API only with
    /// `save_images`).
    pub save: bool,
    /// Request fields accepted but not acted on, reported in the response's info.
    pub ignored: Vec<String>,
    /// What the job does differently from what was asked (no face-restorer weights, …),
    /// reported in the job's info.
    pub warnings: Vec<String>,
    /// ControlNet units, their preprocessors still to run.
    pub control: Vec<crate::requests::controlnet::ControlJob>,
    /// An A1111 script (`script_name`) run instead of the plain generation.
    pub script: Option<sdkube_pipeline::scripts::Script>,
}

/// A1111's "Hires. fix", which the engine runs after the first pass.
pub use sdkube_pipeline::HiresFix;

/// A1111's "Extras": upscale and/or restore faces on given images.
pub struct ExtrasWork {
    pub images: Vec<(String, DynamicImage)>,
    pub upscale: UpscaleSpec,
    /// GFPGAN visibility 0..1 (0 = off).
    pub gfpgan_visibility: f32,
    pub upscale_first: bool,
    pub save: bool,
}

/// How extras resize: by a factor or to a size, with one or two upscalers blended.
#[derive(Clone, Debug)]
pub struct UpscaleSpec {
    pub upscaler_1: String,
    pub upscaler_2: String,
    pub upscaler_2_visibility: f32,
    pub target: UpscaleTarget,
}

#[derive(Clone, Copy, Debug)]
pub enum UpscaleTarget {
    Factor(f32),
    Size { width: u32, height: u32, crop: bool },
}

impl Work {
    /// Images this job puts into one device batch (for batching compatible jobs).
    pub fn batch_images(&self) -> usize {
        match self {
            Work::Generate(g) => g.request.batch_size,
            _ => 1,
        }
    }

    /// Device steps in all, for progress: sampling steps over every iteration.
    pub fn total_steps(&self) -> usize {
        match self {
            Work::Generate(g) if g.script.is_some() => crate::requests::scripts::total_steps(g),
            Work::Generate(g) => {
                let first = match g.request.init_image {
                    Some(_) => (g.request.steps as f64 * g.request.strength.clamp(0.0, 1.0)).ceil()
                        as usize,
                    None => g.request.steps,
                };
                let hires = g
                    .hires
                    .as_ref()
                    .map_or(0, |h| h.steps_after(g.request.steps));
                (first.max(1) + hires) * g.n_iter
            }
            Work::Extras(e) => e.images.len(),
            Work::CreateEmbedding(_) => 1,
            Work::TrainEmbedding(t) => t.steps,
        }
    }

    /// Whether two jobs can share one device batch: single-iteration txt2img with nothing
    /// run per job afterwards on the device other than what each job does alone.
    pub fn batchable(&self, other: &Work) -> bool {
        match (self, other) {
            (Work::Generate(a), Work::Generate(b)) => {
                a.n_iter == 1
                    && b.n_iter == 1
                    && a.script.is_none()
                    && b.script.is_none()
                    && a.hires.is_none()
                    && b.hires.is_none()
                    && a.control.is_empty()
                    && b.control.is_empty()
                    && a.request.batchable_with(&b.request)
            }
            _ => false,
        }
    }
}
