//! One module per subcommand: its clap arguments and a `run` that calls the owning library.

pub mod doctor;
pub mod fetch;
pub mod generate;
pub mod models;
