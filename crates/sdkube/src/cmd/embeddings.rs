//! `sdkube embeddings list`: what an embeddings folder holds for a model family, split
//! like A1111 into loaded and skipped (with the reason).

use std::path::PathBuf;
use std::process::ExitCode;

use sdkube_models::Family;
use sdkube_pipeline::embeddings::{EmbeddingSet, TextWidths};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List the embeddings of a folder: loaded (name, vectors, shape, hash) and skipped.
    List(ListArgs),
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
    }
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
