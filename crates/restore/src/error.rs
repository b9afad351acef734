//! What can go wrong: [`Error`] for upscaling, weight import and image files, [`FaceError`]
//! for face detection and restoration. Apart from the networks and the face pipeline, so that
//! each imports them without importing the other.

use std::path::PathBuf;

/// What can go wrong restoring an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A weight file that cannot be read.
    #[error(transparent)]
    Weights(#[from] sdkube_weights::Error),
    /// The weight file does not hold the network asked for.
    #[error("wrong weights: {0}")]
    WrongWeights(String),
    /// An ncnn `.param`/`.bin` pair that cannot be converted.
    #[error("ncnn model: {0}")]
    Ncnn(String),
    /// The input image cannot be used (unreadable, empty, too large…).
    #[error("{0}")]
    BadImage(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Errors of the face detection / restoration code.
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    /// A tensor operation failed.
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The weights are not those of the network asked for, or some are missing.
    #[error("wrong or incomplete weights: {0}")]
    Weights(String),
    /// The ONNX model (or the `weights.py` holding it) cannot be read.
    #[error("cannot read the ONNX model: {0}")]
    Onnx(String),
    /// Options out of range, or no detector loaded for a detection.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The image or the faces handed in cannot be used.
    #[error("invalid input: {0}")]
    Input(String),
    /// The background upscaler failed.
    #[error("background upscaler failed: {0}")]
    Upscaler(String),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
