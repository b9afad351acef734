//! Prompts, samplers and the txt2img/img2img/inpainting pipeline.

pub mod embeddings;
pub mod generate;
pub mod image_io;
pub mod prompt;
pub mod sampler;
pub mod text;
pub mod tokenizer;
pub mod train;
pub mod vae_decode;

pub use generate::{
    random_seed, upscale_latent, Engine, Generated, Limits, Overrides, Progress, Request, VramMode,
};

/// Everything the pipeline can fail with; messages name the problem for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Image(String),
    #[error(transparent)]
    Sampler(#[from] sampler::SamplerError),
    #[error(transparent)]
    Load(#[from] sdkube_models::checkpoint::LoadError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
