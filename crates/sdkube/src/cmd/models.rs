//! `sdkube models` (work in progress).

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum Command {
    /// List the catalog and what is present in the store.
    List,
}

pub fn run(_command: Command) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`sdkube models` is not implemented yet")
}
