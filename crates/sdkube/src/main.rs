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
    /// LoRA files: list folders, fetch one into a folder.
    #[command(subcommand)]
    Loras(cmd::loras::Command),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
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
        Command::Loras(command) => cmd::loras::run(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            let message = format!("{err:#}");
            eprintln!("error: {message}");
            print_env_notes(&message);
            ExitCode::FAILURE
        }
    }
}

/// clap's own report (help and version included), then where a rejected value came from.
fn usage_error(err: clap::Error) -> ExitCode {
    let _ = err.print();
    if !err.use_stderr() {
        return ExitCode::SUCCESS;
    }
    print_env_notes(&err.to_string());
    ExitCode::from(2)
}

/// In a container, settings arrive as `SDKUBE_*` variables (the chart's ConfigMap), not as
/// flags anyone typed: for each flag an error message names that was not on the command line
/// but set through its variable, say which variable (values of secrets are not repeated).
fn print_env_notes(message: &str) {
    use clap::CommandFactory;
    let given: Vec<String> = std::env::args().skip(1).collect();
    for note in env_notes(&Cli::command(), message, &given, |k| std::env::var(k).ok()) {
        eprintln!("note: {note}");
    }
}

fn env_notes(
    command: &clap::Command,
    message: &str,
    given: &[String],
    lookup: impl Fn(&str) -> Option<String> + Copy,
) -> Vec<String> {
    let mut notes = Vec::new();
    for arg in command.get_arguments() {
        let (Some(long), Some(var)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        let flag = format!("--{long}");
        let named = message.match_indices(&flag).any(|(i, _)| {
            let next = message[i + flag.len()..].chars().next();
            !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
        });
        let on_command_line = given
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        let var = var.to_string_lossy();
        if let (true, false, Some(value)) = (named, on_command_line, lookup(&var)) {
            let secret = arg.is_hide_env_values_set()
                || ["KEY", "TOKEN", "AUTH", "PASS", "SECRET"]
                    .iter()
                    .any(|s| var.contains(s));
            let shown = if secret {
                "<set>".to_owned()
            } else {
                format!("{value:?}")
            };
            let note = format!("{flag} was not given on the command line: its value comes from the environment variable {var}={shown}");
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
    }
    for sub in command.get_subcommands() {
        for note in env_notes(sub, message, given, lookup) {
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
    }
    notes
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn env(
        vars: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&str) -> Option<String> + Copy {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn a_rejected_value_from_the_environment_names_its_variable() {
        // in a pod the wrong value is a chart setting, not a flag anyone typed
        let vars = env(&[("SDKUBE_FETCH_CONNECTIONS", "0"), ("SDKUBE_STORE", "/data")]);
        let message = "invalid value '0' for '--connections <CONNECTIONS>': 0 is not in 1..=64";
        let notes = env_notes(&Cli::command(), message, &["fetch".into()], vars);
        assert_eq!(notes, vec!["--connections was not given on the command line: its value comes from the environment variable SDKUBE_FETCH_CONNECTIONS=\"0\"".to_owned()]);
        // given on the command line: the flag is the source, nothing to add
        let given = ["fetch".into(), "--connections=0".into()];
        assert!(env_notes(&Cli::command(), message, &given, vars).is_empty());
        // a flag whose name extends another's is not confused with it
        assert!(env_notes(&Cli::command(), "bad --store-x", &[], vars).is_empty());
    }

    #[test]
    fn secret_values_are_not_repeated() {
        let vars = env(&[("SDKUBE_API_KEY", "hunter2")]);
        let notes = env_notes(&Cli::command(), "bad --api-key", &[], vars);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].ends_with("SDKUBE_API_KEY=<set>") && !notes[0].contains("hunter2"));
    }
}
