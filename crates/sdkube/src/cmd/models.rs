//! `sdkube models` (work in progress).

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum Command {
    /// List the catalog and what is present in the store.
    List,
    /// Convert ncnn RealESRGAN param/bin files into safetensors for our networks.
    ImportNcnn(super::import_ncnn::Args),
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::ImportNcnn(args) => super::import_ncnn::run(args),
        Command::List => anyhow::bail!("`sdkube models list` is not implemented yet"),
    }
}
