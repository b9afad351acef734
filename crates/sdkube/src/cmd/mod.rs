//! One module per subcommand: its clap arguments and a `run` that calls the owning library.

pub mod bench;
pub mod device;
pub mod doctor;
pub mod embeddings;
pub mod fetch;
pub mod files;
pub mod generate;
pub mod import_ncnn;
pub mod loras;
pub mod models;
pub mod restore_faces;
pub mod serve;
pub mod train_embedding;
pub mod upscale;
