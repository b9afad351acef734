//! Image restoration on candle: RealESRGAN upscaling ([`esrgan`], networks in [`rrdbnet`] and
//! [`srvgg`], ncnn model import in [`ncnn`]) and GFPGAN face restoration.
//!
//! Official `.pth` releases load directly through `sdkube-weights` (tensor-only unpickling);
//! safetensors too. Image files are read through [`io`], which checks size limits before
//! decoding.

pub mod esrgan;
pub mod face;
pub mod gfpgan;
pub mod io;
pub mod ncnn;
pub mod retinaface;
pub mod rrdbnet;
pub mod srvgg;

pub use esrgan::{Esrgan, EsrganArch, TileOptions};

/// What can go wrong restoring an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Weights(#[from] sdkube_weights::Error),
    /// The weight file does not hold the network asked for.
    #[error("wrong weights: {0}")]
    WrongWeights(String),
    #[error("ncnn model: {0}")]
    Ncnn(String),
    /// The input image cannot be used (unreadable, empty, too large…).
    #[error("{0}")]
    BadImage(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
