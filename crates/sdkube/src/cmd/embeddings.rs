//! `sdkube embeddings list`: what an embeddings folder holds for a model family, split
//! like A1111 into loaded and skipped (with the reason).
//! `sdkube embeddings add REPO`: fetches an sd-concepts-library style Hugging Face repo
//! (`learned_embeds.bin` + `token_identifier.txt`) through the model store (so `HF_ENDPOINT`,
//! `HF_TOKEN`, proxies, retries and verification apply) and installs it into the embeddings
//! folder as `<token>.bin`, after checking that it is a tensor-only embedding.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sdkube_models::Family;
use sdkube_pipeline::embeddings::{read_embedding, EmbeddingSet, TextWidths};
use sdkube_store::{fetch_blocking, FetchOptions, FileSource, FileSpec, ModelEntry};

use super::fetch::{StoreArgs, Usage};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List the embeddings of a folder: loaded (name, vectors, shape, hash) and skipped.
    List(ListArgs),
    /// Fetch an sd-concepts-library style repo into the embeddings folder.
    Add(AddArgs),
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// Hugging Face repo, `owner/name` (e.g. `sd-concepts-library/cat-toy`).
    pub repo: String,
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Embeddings folder to install into.
    #[arg(long, env = "SDKUBE_EMBEDDINGS", default_value = "embeddings")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Embeddings folder (subfolders included).
    #[arg(long, env = "SDKUBE_EMBEDDINGS", default_value = "embeddings")]
    pub dir: PathBuf,
    /// Check widths against this model (diffusers folder or single file) …
    #[arg(long, conflicts_with = "family")]
    pub model: Option<PathBuf>,
    /// … or against a released family's text encoders: sd1, sd2, sdxl.
    #[arg(long, default_value = "sd1")]
    pub family: String,
    /// One JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::List(args) => list(args),
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

/// The concept repo as a store entry: its two files, by name.
fn concept_entry(repo: &str, revision: &str) -> ModelEntry {
    let file = |path: &str| FileSpec {
        source: FileSource::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
            path: path.to_string(),
        },
        size: None,
        sha256: None,
    };
    ModelEntry {
        name: format!("embedding--{}", repo.replace('/', "--")),
        kind: "embedding".into(),
        description: format!("textual-inversion concept {repo}"),
        files: vec![file("learned_embeds.bin"), file("token_identifier.txt")],
    }
}

/// The file stem for `token` (`<cat-toy>` stays `<cat-toy>`: the prompt word), refusing
/// what cannot be a file name.
fn token_file_stem(token: &str) -> Result<&str, String> {
    let token = token.trim();
    if token.is_empty()
        || token.starts_with('.')
        || token
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "token_identifier.txt holds {token:?}, which cannot be an embedding file name"
        ));
    }
    Ok(token)
}

fn add(args: &AddArgs) -> Result<ExitCode, AddError> {
    let parts: Vec<&str> = args.repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty() || *p == "..") {
        return Err(usage(format!(
            "{:?} is not a Hugging Face repo id (owner/name)",
            args.repo
        )));
    }
    let store = args.store.open_store().map_err(AddError::Usage)?;
    let entry = concept_entry(&args.repo, &args.revision);
    let options = FetchOptions::from_env();
    fetch_blocking(&store, std::slice::from_ref(&entry), &options, |event| {
        if let Ok(line) = serde_json::to_string(&event) {
            tracing::debug!(%line, "fetch");
        }
    })?;
    let token_path = store.file_path(&entry.name, "token_identifier.txt");
    let token = std::fs::read_to_string(&token_path)?;
    let stem = token_file_stem(&token).map_err(usage)?;
    let fetched = store.file_path(&entry.name, "learned_embeds.bin");
    let vectors = read_embedding(&fetched).map_err(|e| usage(e.to_string()))?;
    std::fs::create_dir_all(&args.dir)?;
    let target = args.dir.join(format!("{stem}.bin"));
    install(&fetched, &target)?;
    eprintln!(
        "{}: {} vector(s) {} wide, use it in a prompt as {stem}",
        args.repo,
        vectors.count(),
        vectors.first.dims()[1]
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
            "{} already exists with other content; remove it first",
            to.display()
        )));
    }
    let tmp = to.with_extension("bin.partial");
    std::fs::write(&tmp, &data)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let widths = match &args.model {
        Some(model) => TextWidths::of(&sdkube_models::load(model, &Default::default())?),
        None => match args.family.as_str() {
            "sd1" => Family::Sd1.into(),
            "sd2" => Family::Sd2.into(),
            "sdxl" => Family::Sdxl.into(),
            other => {
                eprintln!("error: unknown family {other:?}: use sd1, sd2 or sdxl");
                return Ok(ExitCode::from(2));
            }
        },
    };
    let set = EmbeddingSet::load_dir(&args.dir, widths)?;
    if args.json {
        let skipped: serde_json::Map<String, serde_json::Value> = set
            .skipped()
            .iter()
            .map(|(name, reason)| (name.clone(), reason.clone().into()))
            .collect();
        let doc = serde_json::json!({ "loaded": set.loaded(), "skipped": skipped });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for e in set.loaded() {
            println!(
                "loaded  {}  vectors {}  shape {:?}  hash {}  {}",
                e.name,
                e.vectors,
                e.shape,
                e.hash,
                e.path.display()
            );
        }
        for (name, reason) in set.skipped() {
            println!("skipped {name}: {reason}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
