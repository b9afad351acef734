//! `sdkube`: Stable Diffusion as a Kubernetes service.
//!
//! This binary only parses the command line and hands each subcommand to the library crate
//! that owns it (see README's architecture section). Exit codes: 0 success, 1 failure or
//! findings, 2 usage or environment error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "sdkube",
    version,
    about = "Stable Diffusion as a Kubernetes service",
    args_override_self = true
)]
struct Cli {
    /// Log as JSON lines (for cluster log collectors).
    #[arg(long, global = true, env = "SDKUBE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the web UI and the APIs.
    Serve(cmd::serve::Args),
    /// txt2img / img2img / inpainting from the command line.
    Generate(cmd::generate::Args),
    /// Upscale images with RealESRGAN.
    Upscale(cmd::upscale::Args),
    /// Restore faces in images with GFPGAN.
    RestoreFaces(cmd::restore_faces::Args),
    /// Download models into the model store.
    Fetch(cmd::fetch::Args),
    /// List, verify or remove models in the store.
    #[command(subcommand)]
    Models(cmd::models::Command),
    /// Diagnose a cluster deployment or the local machine.
    Doctor(cmd::doctor::Args),
    /// Time the full-size networks with random weights.
    Bench(cmd::bench::Args),
    /// Train a textual-inversion embedding.
    TrainEmbedding(cmd::train_embedding::Args),
    /// Textual-inversion embeddings: list a folder.
    #[command(subcommand)]
    Embeddings(cmd::embeddings::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let result = match cli.command {
        Command::Serve(args) => cmd::serve::run(args),
        Command::Upscale(args) => cmd::upscale::run(args),
        Command::RestoreFaces(args) => cmd::restore_faces::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Fetch(args) => cmd::fetch::run(args),
        Command::Models(command) => cmd::models::run(command),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::TrainEmbedding(args) => cmd::train_embedding::run(args),
        Command::Embeddings(command) => cmd::embeddings::run(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SDKUBE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
