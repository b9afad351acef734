//! What can go wrong: [`Error`] for upscaling, weight import and image files, [`FaceError`]
//! for face detection and restoration. Apart from the networks and the face pipeline, so that
//! each imports them without importing the other.

use std::path::PathBuf;

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

/// Errors of the face detection / restoration code.
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("wrong or incomplete weights: {0}")]
    Weights(String),
    #[error("cannot read the ONNX model: {0}")]
    Onnx(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("background upscaler failed: {0}")]
    Upscaler(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
