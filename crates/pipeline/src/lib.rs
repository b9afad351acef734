//! Prompts, samplers and the txt2img/img2img/inpainting pipeline.

pub mod control;
pub mod embeddings;
pub mod generate;
pub mod hires;
pub mod image_io;
pub mod infotext;
mod init_image;
pub mod latent_upscale;
pub mod loras;
pub mod prompt;
pub mod refiner;
pub mod sampler;
pub mod scripts;
pub mod text;
pub mod tokenizer;
pub mod train;
pub mod vae_decode;
pub mod variation;

pub use generate::{
    random_seed, Engine, Generated, Limits, Overrides, Progress, Request, VramMode,
};
pub use hires::{HiresError, HiresFix, HiresSize};
pub use infotext::Infotext;
pub use refiner::Refiner;
pub use sdkube_models::unet::StepCaching;

/// Everything the pipeline can fail with; messages name the problem for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is not valid (bounds, sampler, images); the message says why.
    #[error("{0}")]
    Invalid(String),
    /// An input image cannot be used.
    #[error("{0}")]
    Image(String),
    /// The sampler could not be chosen or failed.
    #[error(transparent)]
    Sampler(#[from] sampler::SamplerError),
    /// The model could not be loaded.
    #[error(transparent)]
    Load(#[from] sdkube_models::checkpoint::LoadError),
    /// A tensor operation failed.
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
