//! Textual-inversion embeddings (Gal et al. 2022, <https://arxiv.org/abs/2208.01618>):
//! a directory of files, each a few learned token vectors that a prompt calls by name.
//!
//! Read like AUTOMATIC1111's `modules/textual_inversion/textual_inversion.py`
//! (`create_embedding_from_data`), every format through the tensor-only readers of
//! `sdkube_weights` (nothing in a pickle is ever executed):
//!
//! - A1111 `.pt`: `{"string_to_param": {"*": [n, d]}, "name": …, "step": …}`;
//! - A1111 `.safetensors` and diffusers `learned_embeds.{bin,safetensors}`: one tensor,
//!   `{"emb_params": [n, d]}` or `{"<token>": [d] | [n, d]}`;
//! - SDXL pairs: `{"clip_l": [n, 768], "clip_g": [n, 1280]}`.
//!
//! The name is the file stem, wherever the file sits under the directory (subfolders are
//! for the user's order, as in A1111). A name may be an ordinary word: `cat.pt` then
//! replaces "cat" in every prompt, as A1111 does; a name the tokenizer turns into nothing
//! cannot be called and is skipped with that reason. Files whose vectors do not fit the
//! model's text encoders are listed in [`EmbeddingSet::skipped`] with the reason, like
//! A1111's loaded/skipped split; [`EmbeddingSet::reload`] re-reads only the files whose
//! size or modification time changed.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use candle_core::{DType, Device, Tensor};
use sdkube_models::{Family, SdWeights};
use sdkube_weights::Value;
use sha2::{Digest, Sha256};

use crate::prompt::EmbeddingIndex;
use crate::tokenizer::ClipTokenizer;

/// File extensions scanned for embeddings.
pub const EXTENSIONS: [&str; 3] = ["pt", "bin", "safetensors"];

/// Why one embedding file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    /// The file cannot be read as weights.
    #[error(transparent)]
    Read(#[from] sdkube_weights::Error),
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no tensor in any known embedding layout.
    #[error(
        "{}: no embedding in it: expected `string_to_param` (A1111 .pt), one tensor \
         (`emb_params`, diffusers `{{token: tensor}}`) or a `clip_l` + `clip_g` pair (SDXL); \
         found {found}", path.display()
    )]
    NoEmbedding {
        /// The file.
        path: PathBuf,
        /// What it holds instead.
        found: String,
    },
    /// A tensor that should be vectors has another shape.
    #[error("{}: `{key}` has shape {shape:?}; an embedding is [vectors, width] or [width]", path.display())]
    BadShape {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// An SDXL pair whose two halves have different vector counts.
    #[error(
        "{}: `clip_l` has {l} vectors but `clip_g` has {g}; an SDXL embedding has one \
         vector of each per token", path.display()
    )]
    PairMismatch {
        /// The file.
        path: PathBuf,
        /// Vectors of `clip_l`.
        l: usize,
        /// Vectors of `clip_g`.
        g: usize,
    },
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Which text encoder a vector is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderSlot {
    /// The only encoder of SD 1.x / 2.x, SDXL's CLIP ViT-L (`clip_l`).
    First,
    /// SDXL's OpenCLIP ViT-bigG (`clip_g`).
    Second,
}

/// Widths of a model's text encoders: what an embedding must match to be usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextWidths {
    /// The first (or only) encoder's.
    pub first: usize,
    /// SDXL's second encoder.
    pub second: Option<usize>,
}

impl TextWidths {
    /// The widths of a loaded model (tiny test models included).
    pub fn of(weights: &SdWeights) -> Self {
        Self {
            first: weights.text_encoder.config.hidden_size,
            second: weights
                .text_encoder_2
                .as_ref()
                .map(|c| c.config.hidden_size),
        }
    }
}

impl From<Family> for TextWidths {
    /// The released models: SD 1.x 768, SD 2.x 1024, SDXL 768 + 1280.
    fn from(family: Family) -> Self {
        match family {
            Family::Sd1 => Self {
                first: 768,
                second: None,
            },
            Family::Sd2 => Self {
                first: 1024,
                second: None,
            },
            Family::Sdxl => Self {
                first: 768,
                second: Some(1280),
            },
            Family::SdxlRefiner => Self {
                first: 1280,
                second: None,
            },
        }
    }
}

impl From<&SdWeights> for TextWidths {
    fn from(weights: &SdWeights) -> Self {
        Self::of(weights)
    }
}

/// What the API lists about a loaded embedding.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EmbeddingInfo {
    /// File stem: the word a prompt uses.
    pub name: String,
    /// Token slots it takes in a prompt.
    pub vectors: usize,
    /// `[vectors, width]`; SDXL pairs give the summed width (768 + 1280 = 2048), as A1111.
    pub shape: Vec<usize>,
    /// The file it was read from.
    pub path: PathBuf,
    /// First 12 hex digits of the file's sha256 (A1111's `shorthash`, "TI hashes").
    pub hash: String,
}

/// The vectors of one embedding file, f32 on the CPU.
#[derive(Debug, Clone)]
pub struct EmbeddingVectors {
    /// `[n, d]` for the first (or only) encoder.
    pub first: Tensor,
    /// `[n, d2]` for SDXL's second encoder.
    pub second: Option<Tensor>,
}

impl EmbeddingVectors {
    /// Vectors: the token slots the embedding takes in a prompt.
    pub fn count(&self) -> usize {
        self.first.dims()[0]
    }

    fn shape(&self) -> Vec<usize> {
        let width = self.first.dims()[1] + self.second.as_ref().map_or(0, |t| t.dims()[1]);
        vec![self.count(), width]
    }

    /// Why these vectors cannot condition a model with `widths`, if they cannot.
    fn mismatch(&self, widths: TextWidths) -> Option<String> {
        let first = self.first.dims()[1];
        match (&self.second, widths.second) {
            (None, None) | (Some(_), Some(_)) if first != widths.first => Some(format!(
                "vectors are {first} wide but the model's text encoder is {} wide \
                 (an embedding for another model family)",
                widths.first
            )),
            (Some(g), Some(w2)) if g.dims()[1] != w2 => Some(format!(
                "`clip_g` vectors are {} wide but the model's second text encoder is {w2} wide",
                g.dims()[1]
            )),
            (None, Some(_)) => Some(format!(
                "a single-encoder embedding ({first} wide) but this SDXL model needs a \
                 `clip_l` + `clip_g` pair"
            )),
            (Some(_), None) => Some(
                "an SDXL embedding (`clip_l` + `clip_g`) but the model has one text encoder"
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// The vectors for one encoder.
    pub fn for_slot(&self, slot: EncoderSlot) -> Option<&Tensor> {
        match slot {
            EncoderSlot::First => Some(&self.first),
            EncoderSlot::Second => self.second.as_ref(),
        }
    }
}

/// Reads the vectors of one embedding file (any supported layout).
pub fn read_embedding(path: &Path) -> Result<EmbeddingVectors, EmbeddingError> {
    let tree = sdkube_weights::load_tree(path)?;
    embedding_from_tree(path, &tree)
}

/// [`read_embedding`] of a file already in memory (an upload, a fuzzer's input); `path`
/// only names it in errors.
pub fn read_embedding_bytes(path: &Path, data: &[u8]) -> Result<EmbeddingVectors, EmbeddingError> {
    let tree = sdkube_weights::load_tree_from_bytes(data).map_err(|error| {
        sdkube_weights::Error::File {
            path: path.to_path_buf(),
            error: Box::new(error),
        }
    })?;
    embedding_from_tree(path, &tree)
}

fn embedding_from_tree(path: &Path, tree: &Value) -> Result<EmbeddingVectors, EmbeddingError> {
    let as_matrix = |key: &str, t: &Tensor| -> Result<Tensor, EmbeddingError> {
        let t = match t.rank() {
            1 if t.dims()[0] > 0 => t.unsqueeze(0)?,
            2 if t.dims()[0] > 0 && t.dims()[1] > 0 => t.clone(),
            _ => {
                return Err(EmbeddingError::BadShape {
                    path: path.to_path_buf(),
                    key: key.to_string(),
                    shape: t.dims().to_vec(),
                })
            }
        };
        Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    };
    let no_embedding = |found: String| EmbeddingError::NoEmbedding {
        path: path.to_path_buf(),
        found,
    };
    if let Some(params) = tree.get("string_to_param") {
        // A1111 `.pt`: one entry, conventionally "*".
        let tensors: Vec<(String, &Tensor)> = match params {
            Value::Dict(d) => d
                .iter()
                .filter_map(|(k, v)| Some((key_text(k), v.as_tensor()?)))
                .collect(),
            _ => Vec::new(),
        };
        return match tensors.as_slice() {
            [(key, t)] => Ok(EmbeddingVectors {
                first: as_matrix(&format!("string_to_param.{key}"), t)?,
                second: None,
            }),
            _ => Err(no_embedding(format!(
                "`string_to_param` with {} tensors",
                tensors.len()
            ))),
        };
    }
    let Value::Dict(entries) = tree else {
        return Err(no_embedding("no dict at the top level".into()));
    };
    if let (Some(l), Some(g)) = (
        tree.get("clip_l").and_then(Value::as_tensor),
        tree.get("clip_g").and_then(Value::as_tensor),
    ) {
        let (l, g) = (as_matrix("clip_l", l)?, as_matrix("clip_g", g)?);
        if l.dims()[0] != g.dims()[0] {
            return Err(EmbeddingError::PairMismatch {
                path: path.to_path_buf(),
                l: l.dims()[0],
                g: g.dims()[0],
            });
        }
        return Ok(EmbeddingVectors {
            first: l,
            second: Some(g),
        });
    }
    let tensors: Vec<(String, &Tensor)> = entries
        .iter()
        .filter_map(|(k, v)| Some((key_text(k), v.as_tensor()?)))
        .collect();
    match tensors.as_slice() {
        [(key, t)] => Ok(EmbeddingVectors {
            first: as_matrix(key, t)?,
            second: None,
        }),
        [] => Err(no_embedding(format!(
            "keys {:?} and no tensor",
            entries.iter().map(|(k, _)| key_text(k)).collect::<Vec<_>>()
        ))),
        many => Err(no_embedding(format!(
            "{} tensors ({})",
            many.len(),
            many.iter()
                .take(4)
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn key_text(k: &Value) -> String {
    match k {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// A1111's `shorthash`: the first 12 hex digits of the file's sha256.
pub fn short_hash(path: &Path) -> Result<String, EmbeddingError> {
    let io = |source| EmbeddingError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
}

/// One scanned file, kept to skip re-reading it when unchanged.
#[derive(Debug, Clone)]
struct ScannedFile {
    stamp: (u64, Option<SystemTime>),
    name: String,
    /// Vectors and hash, or why the file could not be read.
    content: Result<(EmbeddingVectors, String), String>,
}

/// The embeddings of a directory, split into those the model can use and those it cannot.
#[derive(Debug, Clone)]
pub struct EmbeddingSet {
    dir: Option<PathBuf>,
    widths: TextWidths,
    /// Every file found by the last scan, by path (sorted: the first of two same-named
    /// files wins, deterministically).
    files: BTreeMap<PathBuf, ScannedFile>,
    loaded: Vec<EmbeddingInfo>,
    skipped: Vec<(String, String)>,
    vectors: HashMap<String, EmbeddingVectors>,
    index: EmbeddingIndex,
}

impl EmbeddingSet {
    /// No embeddings (a model without an embeddings directory).
    pub fn empty(widths: impl Into<TextWidths>) -> Self {
        Self {
            dir: None,
            widths: widths.into(),
            files: BTreeMap::new(),
            loaded: Vec::new(),
            skipped: Vec::new(),
            vectors: HashMap::new(),
            index: EmbeddingIndex::new(),
        }
    }

    /// Reads every embedding under `dir` (recursively) for a model with `widths` (a
    /// [`Family`] for the released models, or [`TextWidths::of`] a loaded one). Files that
    /// cannot be used are listed in [`skipped`](Self::skipped); only a directory that
    /// cannot be read is an error. A missing directory is an empty set.
    pub fn load_dir(dir: &Path, widths: impl Into<TextWidths>) -> Result<Self, EmbeddingError> {
        let mut set = Self::empty(widths);
        set.dir = Some(dir.to_path_buf());
        set.reload()?;
        Ok(set)
    }

    /// Re-scans the directory: new and changed files (size or modification time) are read,
    /// removed ones dropped, unchanged ones kept as they were. Returns whether anything
    /// changed.
    pub fn reload(&mut self) -> Result<bool, EmbeddingError> {
        let Some(dir) = self.dir.clone() else {
            return Ok(false);
        };
        let mut found = Vec::new();
        if dir.exists() {
            scan(&dir, &mut found)?;
        }
        let mut files = BTreeMap::new();
        let mut changed = found.len() != self.files.len();
        for (path, stamp) in found {
            let file = match self.files.remove(&path) {
                Some(old) if old.stamp == stamp => old,
                _ => {
                    changed = true;
                    read_file(&path, stamp)
                }
            };
            files.insert(path, file);
        }
        self.files = files;
        self.rebuild();
        Ok(changed)
    }

    /// Re-sorts into loaded/skipped for a model with other text-encoder widths.
    pub fn set_widths(&mut self, widths: impl Into<TextWidths>) {
        self.widths = widths.into();
        self.rebuild();
    }

    /// Adds vectors under `name` without a file (tests, and training's live vectors).
    pub fn insert(&mut self, name: &str, vectors: EmbeddingVectors, path: &Path, hash: &str) {
        let stamp = (0, None);
        self.files.insert(
            path.to_path_buf(),
            ScannedFile {
                stamp,
                name: name.to_string(),
                content: Ok((vectors, hash.to_string())),
            },
        );
        self.rebuild();
    }

    fn rebuild(&mut self) {
        self.loaded.clear();
        self.skipped.clear();
        self.vectors.clear();
        self.index = EmbeddingIndex::new();
        let tokenizer = ClipTokenizer::shared();
        for (path, file) in &self.files {
            let skip = |reason: String| (file.name.clone(), reason);
            let (vectors, hash) = match &file.content {
                Ok(content) => content,
                Err(reason) => {
                    self.skipped.push(skip(reason.clone()));
                    continue;
                }
            };
            if let Some(reason) = vectors.mismatch(self.widths) {
                self.skipped.push(skip(reason));
                continue;
            }
            if let Some(first) = self.loaded.iter().find(|e| e.name == file.name) {
                self.skipped.push(skip(format!(
                    "{}: the name is already used by {}",
                    path.display(),
                    first.path.display()
                )));
                continue;
            }
            let registered = match &tokenizer {
                Ok(t) => self
                    .index
                    .insert(t, &file.name, vectors.count())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(reason) = registered {
                self.skipped.push(skip(reason));
                continue;
            }
            self.loaded.push(EmbeddingInfo {
                name: file.name.clone(),
                vectors: vectors.count(),
                shape: vectors.shape(),
                path: path.clone(),
                hash: hash.clone(),
            });
            self.vectors.insert(file.name.clone(), vectors.clone());
        }
        self.loaded.sort_by(|a, b| a.name.cmp(&b.name));
        self.skipped.sort();
    }

    /// The directory this set reads, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The encoder widths embeddings are checked against.
    pub fn widths(&self) -> TextWidths {
        self.widths
    }

    /// Usable embeddings, by name.
    pub fn loaded(&self) -> &[EmbeddingInfo] {
        &self.loaded
    }

    /// (name, reason) of every file that is not usable with this model.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }

    /// The usable embedding called `name`.
    pub fn get(&self, name: &str) -> Option<&EmbeddingInfo> {
        self.loaded.iter().find(|e| e.name == name)
    }

    /// The vectors a prompt word `name` stands for, for one encoder.
    pub fn vectors(&self, name: &str, slot: EncoderSlot) -> Option<&Tensor> {
        self.vectors.get(name)?.for_slot(slot)
    }

    /// What the prompt tokenizer matches names against.
    pub fn index(&self) -> &EmbeddingIndex {
        &self.index
    }
}

/// Collects `(path, (size, mtime))` of embedding files under `dir`, skipping hidden entries.
fn scan(
    dir: &Path,
    out: &mut Vec<(PathBuf, (u64, Option<SystemTime>))>,
) -> Result<(), EmbeddingError> {
    let io = |source| EmbeddingError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            scan(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push((path, (meta.len(), meta.modified().ok())));
        }
    }
    Ok(())
}

fn read_file(path: &Path, stamp: (u64, Option<SystemTime>)) -> ScannedFile {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let content = read_embedding(path)
        .and_then(|v| Ok((v, short_hash(path)?)))
        .map_err(|e| e.to_string());
    if let Err(reason) = &content {
        tracing::warn!(path = %path.display(), %reason, "embedding skipped");
    }
    ScannedFile {
        stamp,
        name,
        content,
    }
}
