//! `sdkube models`: the catalog and the model store.
//!
//! Exit codes: 0 success (for `verify`: every checked file is intact); 1 `verify` found a
//! missing or corrupt file, or a removal failed; 2 usage or environment (unknown model, bad
//! catalog, store not usable).

use std::process::ExitCode;

use sdkube_store::{FileStatus, HumanBytes};

use super::fetch::{StoreArgs, Usage};

#[derive(clap::Subcommand)]
pub enum Command {
    /// List the catalog: each model, its size and whether it is present in the store.
    List(ListArgs),
    /// Re-hash stored files against the manifest (all models, or those named).
    Verify(VerifyArgs),
    /// Remove models from the store.
    Remove(RemoveArgs),
    /// Convert ncnn RealESRGAN param/bin files into safetensors for our networks.
    ImportNcnn(super::import_ncnn::Args),
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// One JSON object per model instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Models to verify (default: every model in the store).
    names: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(clap::Args)]
pub struct RemoveArgs {
    /// Models to remove.
    #[arg(required = true)]
    names: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let result = match command {
        Command::ImportNcnn(args) => return super::import_ncnn::run(args),
        Command::List(args) => list(args),
        Command::Verify(args) => verify(args),
        Command::Remove(args) => remove(args),
    };
    Ok(result.unwrap_or_else(Usage::report))
}

fn list(args: ListArgs) -> Result<ExitCode, Usage> {
    let catalog = args.store.catalog()?;
    let store = args.store.open_store()?;
    let manifest = store.manifest().map_err(|e| Usage(e.to_string()))?;
    if !args.json {
        println!(
            "{:<26} {:<14} {:>10}  {:<8} DESCRIPTION",
            "NAME", "KIND", "SIZE", "PRESENT"
        );
    }
    for model in catalog.models() {
        let size: Option<u64> = model.files.iter().map(|f| f.size).sum();
        let present = store.model_path(&model.name);
        let stored_size: Option<u64> = manifest
            .models
            .get(&model.name)
            .map(|m| m.files.iter().map(|f| f.size).sum());
        let size = size.or(stored_size);
        if args.json {
            let line = serde_json::json!({
                "name": model.name,
                "kind": model.kind,
                "description": model.description,
                "size": size,
                "present": present.is_some(),
                "path": present.as_ref().map(|p| p.display().to_string()),
                "files": model.files,
            });
            println!("{line}");
        } else {
            let size = size
                .map(|s| HumanBytes(s).to_string())
                .unwrap_or_else(|| "?".into());
            let present = if present.is_some() { "yes" } else { "no" };
            println!(
                "{:<26} {:<14} {:>10}  {:<8} {}",
                model.name, model.kind, size, present, model.description
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs) -> Result<ExitCode, Usage> {
    let store = args.store.open_store()?;
    let checks = store
        .verify(&args.names)
        .map_err(|e| Usage(e.to_string()))?;
    let mut bad = 0;
    for check in &checks {
        let status = match &check.status {
            FileStatus::Ok => "ok".to_owned(),
            FileStatus::Missing => "MISSING".to_owned(),
            FileStatus::WrongSize { expected, actual } => {
                format!("WRONG SIZE ({actual} bytes, expected {expected})")
            }
            FileStatus::WrongHash { expected, actual } => {
                format!("CORRUPT (sha256 {actual}, expected {expected})")
            }
        };
        if check.status != FileStatus::Ok {
            bad += 1;
        }
        println!("{}/{}: {status}", check.model, check.path);
    }
    if bad > 0 {
        eprintln!(
            "{bad} of {} file(s) failed; `sdkube fetch` downloads them again",
            checks.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("{} file(s) verified", checks.len());
    Ok(ExitCode::SUCCESS)
}

fn remove(args: RemoveArgs) -> Result<ExitCode, Usage> {
    let store = args.store.open_store()?;
    for name in &args.names {
        match store.remove(name) {
            Ok(()) => println!("removed {name}"),
            Err(sdkube_store::StoreError::NotPresent(_)) => {
                return Err(Usage(format!("model {name:?} is not in the store")))
            }
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
