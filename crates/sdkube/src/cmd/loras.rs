//! `sdkube loras list`: the LoRA files of some folders with name, alias and hash.
//! `sdkube loras add SOURCE`: fetches a LoRA file through the model store (so `HF_ENDPOINT`,
//! `HF_TOKEN`, proxies, retries, resume and sha256 verification apply), checks that it is a
//! LoRA sdkube reads, and installs it into a LoRA folder as `<name>.<ext>`. SOURCE is a plain
//! `http(s)://` URL or a Hugging Face file, `owner/repo/path/in/repo.safetensors` (optionally
//! `@revision` at the end).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sdkube_models::lora::LoraFile;
use sdkube_pipeline::loras::LoraLibrary;
use sdkube_store::{fetch_blocking, FetchOptions, FileSource, FileSpec, ModelEntry};

use super::fetch::{StoreArgs, Usage};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List the LoRA files of folders: name, alias, hash, path.
    List(ListArgs),
    /// Fetch a LoRA file (URL or Hugging Face file) into a LoRA folder.
    Add(AddArgs),
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// `https://…/file.safetensors`, or `owner/repo/path.safetensors[@revision]` on the hub.
    pub source: String,
    /// The name prompts will use (`<lora:NAME:1>`); default: the file's stem.
    #[arg(long)]
    pub name: Option<String>,
    /// Expected sha256 of the file (lower-case hex), checked before it is installed.
    #[arg(long)]
    pub sha256: Option<String>,
    /// LoRA folder to install into.
    #[arg(long, env = "SDKUBE_LORA_DIR", default_value = "./data/loras")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// LoRA folders (subfolders included).
    #[arg(
        long,
        env = "SDKUBE_LORA_DIRS",
        value_delimiter = ',',
        default_value = "./data/loras"
    )]
    pub dirs: Vec<PathBuf>,
    /// One JSON list (A1111's `/sdapi/v1/loras` objects) instead of lines.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::List(args) => list(&args),
        Command::Add(args) => match add(&args) {
            Ok(code) => Ok(code),
            Err(AddError::Usage(u)) => Ok(u.report()),
            Err(AddError::Other(e)) => Err(e),
        },
    }
}

enum AddError {
    Usage(Usage),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for AddError {
    fn from(e: E) -> Self {
        AddError::Other(e.into())
    }
}

fn usage(message: String) -> AddError {
    AddError::Usage(Usage(message))
}

/// The store entry and the file's name for a SOURCE.
fn entry_for(args: &AddArgs) -> Result<(ModelEntry, String), AddError> {
    // (source, path in the store's model folder, file name)
    let (source, stored_as, file_name) =
        if args.source.starts_with("http://") || args.source.starts_with("https://") {
            let path = args.source.split(['?', '#']).next().unwrap_or("");
            let file_name = path.rsplit('/').next().unwrap_or("").to_string();
            let source = FileSource::Url {
                url: args.source.clone(),
                file_name: file_name.clone(),
            };
            (source, file_name.clone(), file_name)
        } else {
            let (spec, revision) = match args.source.rsplit_once('@') {
                Some((s, r)) => (s, r.to_string()),
                None => (args.source.as_str(), "main".to_string()),
            };
            let parts: Vec<&str> = spec.splitn(3, '/').collect();
            let [owner, repo, path] = parts[..] else {
                return Err(usage(format!(
                    "{:?} is neither an http(s) URL nor a hub file owner/repo/path",
                    args.source
                )));
            };
            let file_name = path.rsplit('/').next().unwrap_or("").to_string();
            let source = FileSource::Hub {
                repo: format!("{owner}/{repo}"),
                revision,
                path: path.to_string(),
            };
            (source, path.to_string(), file_name)
        };
    let stem = Path::new(&file_name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = args.name.clone().unwrap_or(stem);
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\\', ':', '<', '>'])
        || name.chars().any(char::is_control)
    {
        return Err(usage(format!(
            "{name:?} cannot be a LoRA name (a file stem without `/`, `:`, `<`, `>`): give --name"
        )));
    }
    let entry = ModelEntry {
        name: format!("lora--{name}"),
        kind: "lora".into(),
        description: format!("LoRA {name}"),
        files: vec![FileSpec {
            source,
            size: None,
            sha256: args.sha256.clone(),
        }],
    };
    Ok((entry, stored_as))
}

fn add(args: &AddArgs) -> Result<ExitCode, AddError> {
    let (entry, stored_as) = entry_for(args)?;
    let name = entry.name.trim_start_matches("lora--").to_string();
    let store = args.store.open_store().map_err(AddError::Usage)?;
    let options = FetchOptions::from_env();
    fetch_blocking(&store, std::slice::from_ref(&entry), &options, |event| {
        if let Ok(line) = serde_json::to_string(&event) {
            tracing::debug!(%line, "fetch");
        }
    })?;
    let fetched = store.file_path(&entry.name, &stored_as);
    let lora = LoraFile::read(&fetched).map_err(|e| usage(e.to_string()))?;
    let ext = fetched
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_else(|| "safetensors".into());
    std::fs::create_dir_all(&args.dir)?;
    let target = args.dir.join(format!("{name}.{ext}"));
    install(&fetched, &target)?;
    eprintln!(
        "{}: a LoRA of {} modules, use it in a prompt as <lora:{name}:1>",
        args.source,
        lora.module_count()
    );
    println!("{}", target.display());
    Ok(ExitCode::SUCCESS)
}

/// Copies `from` to `to` through a temporary file and a rename; an existing different file
/// is never overwritten.
fn install(from: &Path, to: &Path) -> Result<(), AddError> {
    let data = std::fs::read(from)?;
    if let Ok(existing) = std::fs::read(to) {
        if existing == data {
            return Ok(());
        }
        return Err(usage(format!(
            "{} already exists with other content; remove it first or give --name",
            to.display()
        )));
    }
    let tmp = to.with_extension("partial");
    std::fs::write(&tmp, &data)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let library = LoraLibrary::new(args.dirs.clone());
    if args.json {
        println!("{}", serde_json::to_string_pretty(library.list())?);
        return Ok(ExitCode::SUCCESS);
    }
    for l in library.list() {
        let hash = library.short_hash(l).unwrap_or_else(|e| format!("({e})"));
        println!(
            "{}  alias {}  hash {hash}  {}",
            l.name,
            l.alias,
            l.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
