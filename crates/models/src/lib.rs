//! Stable Diffusion networks on candle: the CLIP text encoders, the UNet (SD 1.x, 2.x, SDXL
//! with its added conditioning), the VAE and ControlNet, plus loading from diffusers folders and
//! single-file A1111/LDM checkpoints.
//!
//! Each network file reads beside its Python reference: same names, same key tree. The layers
//! and ops they are made of (and their CUDA kernels) are `sdkube-nn`'s.

pub mod blocks;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod controlnet;
pub mod ldm;
pub mod lora;
pub mod presets;
pub mod unet;
pub mod vae;

pub use checkpoint::{
    load, model_name, save_diffusers, Family, LoadOptions, Prediction, SdWeights,
};
