//! `sdkube doctor`: say why the deployment is not running, and how to fix it.
//!
//! Exit codes: 0 healthy, 1 findings that need action, 2 the cluster cannot be read.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use sdkube_doctor::local::{check_local, LocalOptions};
use sdkube_doctor::report::{render_text, use_colour, Report};
use sdkube_doctor::{analyze, cluster, exit_code, EXIT_CLUSTER_UNREADABLE};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Namespace of the release (default: the kubeconfig context's namespace).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Helm release name (default: every sdkube pod of the namespace).
    #[arg(long)]
    pub release: Option<String>,
    /// Check this machine instead of a cluster: GPU, CUDA libraries, store, disk, proxy, hub.
    #[arg(long)]
    pub local: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// Model store to check with --local.
    #[arg(long, env = "SDKUBE_STORE", default_value = "./data/models")]
    pub store: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let colour = use_colour(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    if args.local {
        let findings = check_local(&LocalOptions::from_env(args.store.clone()));
        match args.output {
            Output::Json => println!("{}", Report::new("local", &findings).to_json()),
            Output::Text => print!(
                "{}",
                render_text("sdkube doctor --local", &findings, colour)
            ),
        }
        return Ok(ExitCode::from(exit_code(&Ok(findings))));
    }
    let gathered = cluster::gather_blocking(args.namespace.as_deref(), args.release.as_deref());
    let snapshot = match gathered {
        Ok(snapshot) => snapshot,
        Err(err) => {
            let message = format!("{:#}", anyhow::Error::from(err));
            if args.output == Output::Json {
                let body =
                    serde_json::json!({"scope": "cluster", "healthy": false, "error": message});
                println!("{body:#}");
            }
            eprintln!("error: {message}");
            return Ok(ExitCode::from(EXIT_CLUSTER_UNREADABLE));
        }
    };
    let findings = analyze(&snapshot);
    match args.output {
        Output::Json => {
            let mut report = Report::new("cluster", &findings);
            report.namespace = Some(&snapshot.namespace);
            report.release = snapshot.release.as_deref();
            println!("{}", report.to_json());
        }
        Output::Text => {
            let heading = format!(
                "sdkube doctor: namespace {}, {}",
                snapshot.namespace,
                snapshot
                    .release
                    .as_deref()
                    .map(|r| format!("release {r}"))
                    .unwrap_or_else(|| "all releases".to_owned())
            );
            print!("{}", render_text(&heading, &findings, colour));
        }
    }
    Ok(ExitCode::from(exit_code(&Ok(findings))))
}
