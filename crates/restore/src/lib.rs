//! Image restoration on candle: RealESRGAN upscaling ([`esrgan`], networks in [`rrdbnet`] and
//! [`srvgg`], ncnn model import in [`ncnn`]) and GFPGAN face restoration ([`face`], the
//! pipeline, over the networks in [`retinaface`] and [`gfpgan`]). The layers are
//! `sdkube-nn`'s; the errors ([`Error`], [`face::FaceError`]) live apart from both networks
//! and pipeline, so imports only run from the pipeline down to the networks.
//!
//! Official `.pth` releases load directly through `sdkube-weights` (tensor-only unpickling);
//! safetensors too. Image files are read through [`io`], which checks size limits before
//! decoding.

mod error;
pub mod esrgan;
pub mod face;
pub mod gfpgan;
pub mod io;
mod keys;
pub mod ncnn;
pub mod retinaface;
pub mod rrdbnet;
pub mod srvgg;

pub use error::Error;
pub use esrgan::{Esrgan, EsrganArch, TileOptions};
