//! `sdkube fetch`: download models of the catalog into the model store.
//!
//! The Helm chart's init container runs `sdkube fetch <names> --store /data/models
//! --progress json`; it may run any number of times and downloads each file once (files
//! already verified in the store cost no request). `HF_ENDPOINT` (a hub mirror), `HF_TOKEN`
//! (gated repos), `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` (either case) and
//! `SDKUBE_CA_BUNDLE` (a PEM file of extra trusted CAs: a TLS-inspecting proxy's, a private
//! mirror's) are read from the environment.
//!
//! Exit codes: 0 every named model is present and verified; 1 the download failed (network or
//! server still failing after retries, checksum or size mismatch, a disk write error);
//! 2 usage or environment: unknown model name, bad catalog file, bad proxy URL or CA bundle,
//! untrusted TLS certificate, store not usable, not enough free space, access denied
//! (HTTP 401/403/404: token, repo or path).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use sdkube_store::{
    fetch_blocking, Catalog, FetchOptions, HumanBytes, ModelEntry, ProgressEvent, Store,
};

/// Where the store and the catalog are: shared by `fetch` and `models`.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// The model store directory (the chart's volume).
    #[arg(long, env = "SDKUBE_STORE", default_value = "./data/models")]
    pub store: PathBuf,
    /// A user catalog (TOML, same format as the built-in one) adding or replacing models.
    #[arg(long, env = "SDKUBE_CATALOG")]
    pub catalog: Option<PathBuf>,
}

impl StoreArgs {
    /// Loads the catalog; errors are usage errors (exit 2).
    pub fn catalog(&self) -> Result<Catalog, Usage> {
        Catalog::load(self.catalog.as_deref()).map_err(|e| Usage(e.to_string()))
    }

    pub fn open_store(&self) -> Result<Store, Usage> {
        Store::open(&self.store).map_err(|e| Usage(with_owner_hint(e.to_string(), &self.store)))
    }
}

/// A store this process may not write is the commonest volume mistake in a pod (a node
/// directory left to root, which fsGroup does not fix for hostPath): say who owns what.
fn with_owner_hint(message: String, store: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    if message.contains("(os error 30)") {
        return format!("{message}: the volume is mounted read-only");
    }
    if !message.contains("(os error 13)") {
        return message;
    }
    let Some((dir, meta)) = store
        .ancestors()
        .find_map(|d| std::fs::metadata(d).ok().map(|m| (d, m)))
    else {
        return message;
    };
    // /proc/self belongs to the process's effective user
    let me = std::fs::metadata("/proc/self").map_or("?".to_owned(), |m| m.uid().to_string());
    format!(
        "{message}: {} belongs to uid {} gid {} (mode {:o}) and sdkube runs as uid {me}; make the volume writable for that user",
        dir.display(),
        meta.uid(),
        meta.gid(),
        meta.mode() & 0o7777
    )
}

/// An error that is the operator's to fix: printed, exit code 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl Usage {
    pub fn report(self) -> ExitCode {
        eprintln!("error: {}", self.0);
        ExitCode::from(2)
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Bars on a terminal, JSON lines otherwise.
    Auto,
    /// Progress bars on stderr.
    Bar,
    /// One JSON object per line on stdout (for logs and machines).
    Json,
    /// Errors only.
    None,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Catalog names of the models to fetch (see `sdkube models list`).
    #[arg(env = "SDKUBE_MODELS", value_delimiter = ',', required = true)]
    pub names: Vec<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long, value_enum, default_value = "auto", env = "SDKUBE_PROGRESS")]
    pub progress: ProgressMode,
    /// Parallel ranged connections per large file (1 = a single stream).
    #[arg(long, default_value_t = 4, env = "SDKUBE_FETCH_CONNECTIONS",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
    /// Attempts without progress before giving up on a file.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,
}

/// Looks catalog names up; unknown names are a usage error listing what exists.
pub fn entries(catalog: &Catalog, names: &[String]) -> Result<Vec<ModelEntry>, Usage> {
    let mut out = Vec::new();
    for name in names {
        match catalog.get(name) {
            Some(entry) => out.push(entry.clone()),
            None => {
                let known: Vec<&str> = catalog.models().iter().map(|m| m.name.as_str()).collect();
                return Err(Usage(format!(
                    "unknown model {name:?}; the catalog has: {}",
                    known.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let prepared = args
        .store
        .catalog()
        .and_then(|c| entries(&c, &args.names))
        .and_then(|e| Ok((e, args.store.open_store()?)));
    let (entries, store) = match prepared {
        Ok(ok) => ok,
        Err(usage) => {
            if resolve_mode(args.progress) == ProgressMode::Json {
                print_json(
                    &serde_json::json!({"event": "error", "message": usage.0, "exit_code": 2}),
                );
            }
            return Ok(usage.report());
        }
    };
    let options = FetchOptions {
        connections: usize::from(args.connections),
        max_retries: args.retries,
        ..FetchOptions::from_env()
    };
    let mode = resolve_mode(args.progress);
    let bars = Bars::new(mode == ProgressMode::Bar);
    let result = fetch_blocking(&store, &entries, &options, |event| match mode {
        ProgressMode::Json => print_json(&event),
        ProgressMode::Bar => bars.show(&event),
        _ => {}
    });
    bars.finish();
    match result {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            let code = if err.is_environment() { 2 } else { 1 };
            if mode == ProgressMode::Json {
                print_json(
                    &serde_json::json!({"event": "error", "message": err.to_string(), "exit_code": code}),
                );
            }
            eprintln!("error: {err}");
            Ok(ExitCode::from(code))
        }
    }
}

fn resolve_mode(mode: ProgressMode) -> ProgressMode {
    match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Json,
        other => other,
    }
}

fn print_json(value: &impl serde::Serialize) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, value);
    let _ = writeln!(out);
    let _ = out.flush();
}

/// One bar per file, an overall bar, and messages, on stderr.
struct Bars {
    enabled: bool,
    multi: indicatif::MultiProgress,
    files: Mutex<Vec<(String, indicatif::ProgressBar)>>,
    overall: Mutex<Option<indicatif::ProgressBar>>,
    /// Bytes received this run per file (resumed bytes excluded), for the overall bar.
    received: Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

impl Bars {
    fn new(enabled: bool) -> Bars {
        Bars {
            enabled,
            multi: indicatif::MultiProgress::new(),
            files: Mutex::new(Vec::new()),
            overall: Mutex::new(None),
            received: Mutex::default(),
        }
    }

    /// Records a file's position and moves the overall bar.
    fn advance(&self, key: String, position: u64, resumed_from: Option<u64>) {
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        let entry = received.entry(key).or_insert((0, 0));
        if let Some(resumed) = resumed_from {
            entry.0 = resumed;
        }
        entry.1 = position;
        let total: u64 = received
            .values()
            .map(|(from, at)| at.saturating_sub(*from))
            .sum();
        if let Some(bar) = self
            .overall
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            bar.set_position(total);
        }
    }

    fn bar(&self, key: &str, size: Option<u64>) -> indicatif::ProgressBar {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, bar)) = files.iter().find(|(k, _)| k == key) {
            return bar.clone();
        }
        let bar = self.multi.add(match size {
            Some(size) => indicatif::ProgressBar::new(size),
            None => indicatif::ProgressBar::no_length(),
        });
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:40} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} {eta:>4}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(key.to_owned());
        files.push((key.to_owned(), bar.clone()));
        bar
    }

    fn show(&self, event: &ProgressEvent) {
        if !self.enabled {
            return;
        }
        match event {
            ProgressEvent::WaitingForLock { store } => {
                let _ = self.multi.println(format!(
                    "waiting for another fetcher to finish with {store}"
                ));
            }
            ProgressEvent::Plan {
                files_present,
                files_to_download,
                bytes_to_download,
                ..
            } => {
                let _ = self.multi.println(format!(
                    "{files_present} file(s) present, {files_to_download} to download ({})",
                    HumanBytes(*bytes_to_download)
                ));
                if *files_to_download > 0 {
                    let bar = self
                        .multi
                        .add(indicatif::ProgressBar::new(*bytes_to_download));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg:40} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} {eta:>4}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar.set_message("total");
                    *self.overall.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
                }
            }
            ProgressEvent::FilePresent { model, file, size } => {
                let _ = self
                    .multi
                    .println(format!("{model}/{file}: present ({})", HumanBytes(*size)));
            }
            ProgressEvent::FileStart {
                model,
                file,
                size,
                resumed_from,
                ..
            } => {
                let key = format!("{model}/{file}");
                self.bar(&key, *size).set_position(*resumed_from);
                self.advance(key, *resumed_from, Some(*resumed_from));
            }
            ProgressEvent::FileProgress {
                model,
                file,
                bytes,
                size,
                ..
            } => {
                let key = format!("{model}/{file}");
                self.bar(&key, *size).set_position(*bytes);
                self.advance(key, *bytes, None);
            }
            ProgressEvent::Retry {
                model,
                file,
                attempt,
                delay_ms,
                reason,
            } => {
                let _ = self.multi.println(format!(
                    "{model}/{file}: retry {attempt} in {:.1}s: {reason}",
                    *delay_ms as f64 / 1000.0
                ));
            }
            ProgressEvent::FileDone {
                model, file, size, ..
            } => {
                let key = format!("{model}/{file}");
                let bar = self.bar(&key, Some(*size));
                bar.set_position(*size);
                bar.finish();
                self.advance(key, *size, None);
            }
            ProgressEvent::ModelReady { model, path } => {
                let _ = self.multi.println(format!("{model}: ready at {path}"));
            }
            ProgressEvent::Done { .. } => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = self
            .overall
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            bar.abandon();
        }
        for (_, bar) in self.files.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}
