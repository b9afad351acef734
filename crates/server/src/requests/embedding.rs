//! Textual-inversion requests: A1111's "Create embedding" and "Train embedding", and the
//! device work they become.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::Files;
use crate::error::ApiError;
use crate::work::Work;

/// An embedding name usable as a file stem: letters, digits, `_`, `-`, `.`, no leading dot,
/// so that no name reaches outside the embeddings folder.
pub fn check_embedding_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "embedding name {name:?}: use 1–64 letters, digits, '_', '-' or '.', not starting with '.'"
        )))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct CreateEmbeddingRequest {
    pub name: String,
    pub num_vectors_per_token: usize,
    pub overwrite_old: bool,
    pub init_text: String,
}

impl Default for CreateEmbeddingRequest {
    fn default() -> Self {
        Self {
            name: String::new(),
            num_vectors_per_token: 1,
            overwrite_old: false,
            init_text: "*".into(),
        }
    }
}

/// The work of A1111's "Create embedding": a new embedding initialised from `init_text`,
/// written to `<embeddings>/<name>.safetensors`.
pub fn create_embedding_work(
    files: &Files<'_>,
    r: &CreateEmbeddingRequest,
) -> Result<Work, ApiError> {
    check_embedding_name(&r.name)?;
    let out = files.embeddings.join(format!("{}.safetensors", r.name));
    let existing = ["safetensors", "pt", "bin"]
        .iter()
        .map(|ext| files.embeddings.join(format!("{}.{ext}", r.name)))
        .find(|p| p.exists());
    if let (Some(p), false) = (existing, r.overwrite_old) {
        return Err(ApiError::bad_request(format!(
            "embedding {:?} exists ({}); set overwrite_old to replace it",
            r.name,
            p.display()
        )));
    }
    Ok(Work::CreateEmbedding(crate::work::CreateEmbeddingWork {
        name: r.name.clone(),
        init_text: r.init_text.clone(),
        vectors: r.num_vectors_per_token,
        overwrite: r.overwrite_old,
        out,
    }))
}

/// A1111's training request (fields it has that sdkube does not act on are accepted).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct TrainEmbeddingRequest {
    /// An embedding of the embeddings folder (create it first).
    pub embedding_name: String,
    /// A number; A1111's schedules (`0.005:100, 1e-3:1000`) use their first rate.
    #[schema(value_type = String)]
    pub learn_rate: Value,
    pub batch_size: usize,
    pub gradient_step: usize,
    /// A folder of images under the server's training folder.
    pub data_root: String,
    pub training_width: usize,
    pub training_height: usize,
    pub steps: usize,
    /// `subject.txt`, `style.txt`, `subject_filewords.txt`, … (by A1111's file names).
    pub template_filename: String,
    pub create_image_every: usize,
    pub save_embedding_every: usize,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: Map<String, Value>,
}

impl Default for TrainEmbeddingRequest {
    fn default() -> Self {
        Self {
            embedding_name: String::new(),
            learn_rate: json!("0.005"),
            batch_size: 1,
            gradient_step: 1,
            data_root: String::new(),
            training_width: 512,
            training_height: 512,
            steps: 100_000,
            template_filename: "subject.txt".into(),
            create_image_every: 500,
            save_embedding_every: 500,
            other: Map::new(),
        }
    }
}

/// The work of A1111's training request.
pub fn train_work(files: &Files<'_>, r: &TrainEmbeddingRequest) -> Result<Work, ApiError> {
    use sdkube_pipeline::train::{Template, TrainOptions};
    check_embedding_name(&r.embedding_name)?;
    let dir = files.embeddings;
    let out = ["safetensors", "pt"]
        .iter()
        .map(|ext| dir.join(format!("{}.{ext}", r.embedding_name)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "no embedding {:?} in the embeddings folder: create it first (/sdapi/v1/create/embedding)",
                r.embedding_name
            ))
        })?;
    let rate_text = match &r.learn_rate {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let first_rate = rate_text
        .split(',')
        .next()
        .unwrap_or("")
        .split(':')
        .next()
        .unwrap_or("");
    let learning_rate: f64 = first_rate
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request(format!("learn_rate {rate_text:?} is not a number")))?;
    if r.training_width != r.training_height {
        return Err(ApiError::bad_request(format!(
            "training_width and training_height must be equal (square training), got {}x{}",
            r.training_width, r.training_height
        )));
    }
    if r.steps == 0 || r.steps > 1_000_000 {
        return Err(ApiError::bad_request(format!(
            "steps must be between 1 and 1000000, got {}",
            r.steps
        )));
    }
    // The images must be a folder inside the training folder: a request names a folder,
    // it cannot make the server read anywhere else.
    let root = files.training.to_path_buf();
    let wanted = root.join(r.data_root.trim_start_matches('/'));
    let inside = match (wanted.canonicalize(), root.canonicalize()) {
        (Ok(w), Ok(r)) => w.starts_with(&r) && w.is_dir(),
        _ => false,
    };
    if !inside || r.data_root.split(['/', '\\']).any(|seg| seg == "..") {
        return Err(ApiError::bad_request(format!(
            "data_root {:?} must be a folder of images inside the training folder {}",
            r.data_root,
            root.display()
        )));
    }
    let template = if r.template_filename.contains("style") {
        Template::Style
    } else {
        Template::Subject
    };
    // Training continues the embedding's own vectors (A1111 trains what "Create" made).
    let vectors = sdkube_pipeline::embeddings::read_embedding(&out)
        .map_err(|e| ApiError::bad_request(format!("{}: {e}", out.display())))?
        .count();
    let opts = TrainOptions {
        name: r.embedding_name.clone(),
        vectors,
        steps: r.steps,
        learning_rate,
        batch_size: r.batch_size.max(1),
        template,
        images: wanted,
        size: r.training_width,
        out,
        checkpoint_every: r.save_embedding_every,
        sample_every: r.create_image_every,
        resume: true,
        ..TrainOptions::default()
    };
    Ok(Work::TrainEmbedding(opts))
}
