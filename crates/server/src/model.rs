//! Which checkpoint the server serves, and where it is in getting ready: fetching into the
//! store (with progress), loading onto the devices, ready, or failed with a message.
//!
//! The HTTP side asks for a model by catalog name or path ([`ModelSlot::select`]); the
//! workers load whatever generation of the selection is current. Once a model is ready, a new
//! selection is a *switch*: the served model keeps serving while the new one is fetched and
//! read, and stays when the new one fails (A1111 keeps its checkpoint too), so that one
//! client's bad choice never takes the server out of service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::lock;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Fetching,
    #[default]
    Loading,
    Ready,
    Failed,
}

impl ModelState {
    pub fn label(self) -> &'static str {
        match self {
            ModelState::Fetching => "fetching",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Failed => "failed",
        }
    }
}

/// Bytes fetched so far while the model downloads.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct FetchProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ModelStatus {
    /// Catalog name, or the file/folder name of a path.
    pub name: String,
    pub state: ModelState,
    /// Why it failed, or what it is doing.
    pub message: Option<String>,
    pub progress: Option<FetchProgress>,
    /// "sd1", "sd2" or "sdxl" once loaded.
    pub family: Option<String>,
    /// Seconds the slowest worker's warm-up generation took before it said ready
    /// (`--warm-up`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub warm_up_seconds: Option<f64>,
    #[serde(skip)]
    pub path: Option<PathBuf>,
    /// Bumped on every selection; workers reload when theirs is older.
    #[serde(skip)]
    pub generation: u64,
    /// Workers that have loaded this generation.
    #[serde(skip)]
    pub loaded_by: usize,
    /// What was selected (a path, a title or a name): a worker compares a job's checkpoint
    /// with it.
    #[serde(skip)]
    pub selection: String,
    /// A switch to another checkpoint under way (or just failed) while this one serves.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub switching: Option<Switching>,
}

/// A switch in progress, as `/api/v1/status` and `/readyz` show it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Switching {
    pub name: String,
    pub state: ModelState,
    pub message: Option<String>,
    pub progress: Option<FetchProgress>,
}

/// Where a selection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It serves.
    Serving,
    /// Being fetched or loaded.
    Pending,
    /// It could not be fetched or loaded (why); the served model stayed.
    Failed(String),
    /// A newer selection replaced it before or after it served.
    Replaced,
}

/// What a worker should have loaded: a generation of a selection, read from `path`.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub generation: u64,
    pub name: String,
    pub path: PathBuf,
}

/// The served model and, during a switch, the one replacing it.
struct Slot {
    served: ModelStatus,
    target: Option<ModelStatus>,
    /// Last generation handed out (served and target share the counter).
    generation: u64,
}

/// Where models come from: the store (catalog names) and plain paths.
#[derive(Debug, Clone)]
pub struct ModelSources {
    /// The model store (`sdkube fetch`'s).
    pub store: PathBuf,
    /// A user catalog extending the built-in one.
    pub catalog: Option<PathBuf>,
    /// Extra folders scanned for checkpoint files (`.safetensors`, `.ckpt`) and diffusers
    /// folders, listed by `/sdapi/v1/sd-models`.
    pub checkpoint_dirs: Vec<PathBuf>,
}

impl ModelSources {
    /// The catalog's entries of `kind` (`lora`, `controlnet`, …) that are fetched into the
    /// store: (catalog name, path). Nothing when the store does not exist yet.
    pub fn fetched(&self, kind: &str) -> Vec<(String, PathBuf)> {
        if !self.store.is_dir() {
            return Vec::new();
        }
        match (
            sdkube_store::Store::open(&self.store),
            sdkube_store::Catalog::load(self.catalog.as_deref()),
        ) {
            (Ok(store), Ok(catalog)) => catalog
                .models()
                .iter()
                .filter(|m| m.kind == kind)
                .filter_map(|m| Some((m.name.clone(), store.model_path(&m.name)?)))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A checkpoint that can be selected.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckpointInfo {
    /// Unique in the list: a file's name with its extension, a folder's or catalog name.
    pub title: String,
    /// The file stem (what the infotext's `Model:` says).
    pub name: String,
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// Present on disk (a catalog entry not fetched yet is not).
    pub present: bool,
}

pub struct ModelSlot {
    slot: Mutex<Slot>,
    /// The operator's choices by path (`--model`): listed and selectable by name later.
    by_path: Mutex<Vec<CheckpointInfo>>,
    workers: usize,
    pub sources: ModelSources,
}

/// A checkpoint's title: the file name with its extension, or the folder name.
pub fn title_of_path(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

impl ModelSlot {
    pub fn new(sources: ModelSources, workers: usize) -> Arc<Self> {
        Arc::new(Self {
            slot: Mutex::new(Slot {
                served: ModelStatus {
                    state: ModelState::Loading,
                    message: Some("starting".into()),
                    ..ModelStatus::default()
                },
                target: None,
                generation: 0,
            }),
            by_path: Mutex::new(Vec::new()),
            workers,
            sources,
        })
    }

    /// The served model, with the switch under way if there is one.
    pub fn status(&self) -> ModelStatus {
        let slot = lock(&self.slot);
        let mut s = slot.served.clone();
        s.switching = slot.target.as_ref().map(|t| Switching {
            name: t.name.clone(),
            state: t.state,
            message: t.message.clone(),
            progress: t.progress,
        });
        s
    }

    pub fn is_ready(&self) -> bool {
        lock(&self.slot).served.state == ModelState::Ready
    }

    /// What a worker should have loaded: the switch's new model once it is in the store
    /// (unless it failed), else the served one.
    pub fn wanted(&self) -> Option<Wanted> {
        let slot = lock(&self.slot);
        let of = |s: &ModelStatus| {
            s.path.clone().map(|path| Wanted {
                generation: s.generation,
                name: s.name.clone(),
                path,
            })
        };
        match &slot.target {
            Some(t) if t.state != ModelState::Failed => of(t),
            _ if slot.served.state == ModelState::Failed => None,
            _ => of(&slot.served),
        }
    }

    /// How the selection of `generation` ended (see [`Outcome`]).
    pub fn outcome(&self, generation: u64) -> Outcome {
        let slot = lock(&self.slot);
        let failed = |s: &ModelStatus| {
            Outcome::Failed(s.message.clone().unwrap_or_else(|| "loading failed".into()))
        };
        match (&slot.served, &slot.target) {
            (s, _) if s.generation == generation && s.state == ModelState::Ready => {
                Outcome::Serving
            }
            (s, _) if s.generation == generation && s.state == ModelState::Failed => failed(s),
            (_, Some(t)) if t.generation == generation && t.state == ModelState::Failed => {
                failed(t)
            }
            (_, Some(t)) if t.generation == generation => Outcome::Pending,
            (s, _) if s.generation == generation => Outcome::Pending,
            _ => Outcome::Replaced,
        }
    }

    /// Checkpoints that can be selected: files and folders in the checkpoint directories,
    /// then the catalog's checkpoints (present in the store or not).
    pub fn checkpoints(&self) -> Vec<CheckpointInfo> {
        let mut out = lock(&self.by_path).clone();
        for dir in &self.sources.checkpoint_dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                    (p.is_file() && matches!(ext, "safetensors" | "ckpt"))
                        || p.join("model_index.json").is_file()
                })
                .collect();
            found.sort();
            for p in found {
                if out.iter().any(|c| c.path.as_ref() == Some(&p)) {
                    continue;
                }
                out.push(CheckpointInfo {
                    title: title_of_path(&p),
                    name: sdkube_models::model_name(&p),
                    path: Some(p),
                    present: true,
                });
            }
        }
        if let Ok(catalog) = sdkube_store::Catalog::load(self.sources.catalog.as_deref()) {
            let store = sdkube_store::Store::open(&self.sources.store).ok();
            for entry in catalog.models().iter().filter(|m| m.kind == "checkpoint") {
                if out.iter().any(|c| c.title == entry.name) {
                    continue;
                }
                let path = store.as_ref().and_then(|s| s.model_path(&entry.name));
                out.push(CheckpointInfo {
                    title: entry.name.clone(),
                    name: entry.name.clone(),
                    present: path.is_some(),
                    path,
                });
            }
        }
        out
    }

    /// The listed checkpoint a client names: by title (A1111 clients may add " [hash]"), else
    /// by name.
    pub fn find(&self, selection: &str) -> Option<CheckpointInfo> {
        let wanted = selection.split(" [").next().unwrap_or(selection);
        let list = self.checkpoints();
        let by_title = list.iter().find(|c| c.title == wanted).cloned();
        by_title.or_else(|| list.into_iter().find(|c| c.name == wanted))
    }

    /// Selects the model to serve: an existing path, a checkpoint found in the checkpoint
    /// folders, or a catalog name (fetched in the background when missing from the store).
    /// Returns its generation at once; [`ModelSlot::outcome`] tells how it ends. While a
    /// model serves, the new one replaces it only once every worker has loaded it.
    /// `allow_path`: the operator's `--model` may be any path; API clients only choose among
    /// the listed checkpoints, so that no request can make the server read an arbitrary file.
    pub fn select(self: &Arc<Self>, model: &str, allow_path: bool) -> Result<u64, String> {
        {
            // Already served, or already on its way: nothing to start.
            let slot = lock(&self.slot);
            let same = |s: &ModelStatus| s.selection == model && s.state != ModelState::Failed;
            if let Some(t) = slot.target.as_ref().filter(|t| same(t)) {
                return Ok(t.generation);
            }
            let switching = slot
                .target
                .as_ref()
                .is_some_and(|t| t.state != ModelState::Failed);
            if same(&slot.served) && !switching {
                return Ok(slot.served.generation);
            }
        }
        let as_path = PathBuf::from(model);
        let (name, path) = if allow_path && as_path.exists() {
            let info = CheckpointInfo {
                title: title_of_path(&as_path),
                name: sdkube_models::model_name(&as_path),
                path: Some(as_path.clone()),
                present: true,
            };
            let mut known = lock(&self.by_path);
            known.retain(|c| c.title != info.title);
            known.push(info);
            (sdkube_models::model_name(&as_path), Some(as_path))
        } else if let Some(c) = self.find(model) {
            (c.name, c.path)
        } else {
            return Err(format!(
                "model {model:?} is neither a path nor a checkpoint this server knows \
                 (see /sdapi/v1/sd-models)"
            ));
        };
        let generation = {
            let mut slot = lock(&self.slot);
            slot.generation += 1;
            let (state, message) = match &path {
                Some(_) => (ModelState::Loading, format!("loading {name}")),
                None => (
                    ModelState::Fetching,
                    format!("fetching {name} into the model store"),
                ),
            };
            let status = ModelStatus {
                name: name.clone(),
                state,
                message: Some(message),
                path: path.clone(),
                generation: slot.generation,
                selection: model.to_string(),
                ..ModelStatus::default()
            };
            if slot.served.state == ModelState::Ready {
                slot.target = Some(status);
            } else {
                // Nothing serves yet: nothing to keep.
                slot.served = status;
                slot.target = None;
            }
            slot.generation
        };
        if path.is_none() {
            let slot = self.clone();
            std::thread::spawn(move || slot.fetch(&name, generation));
        }
        Ok(generation)
    }

    fn fetch(&self, name: &str, generation: u64) {
        let result = (|| -> Result<PathBuf, String> {
            let catalog = sdkube_store::Catalog::load(self.sources.catalog.as_deref())
                .map_err(|e| e.to_string())?;
            let entry = catalog
                .get(name)
                .ok_or_else(|| format!("{name} is not in the catalog"))?
                .clone();
            let store =
                sdkube_store::Store::open(&self.sources.store).map_err(|e| e.to_string())?;
            let options = sdkube_store::FetchOptions::from_env();
            // Bytes per file, summed into the model's progress.
            let per_file = Mutex::new(std::collections::HashMap::<String, u64>::new());
            sdkube_store::fetch_blocking(&store, &[entry], &options, |event| {
                tracing::info!(target: "sdkube::fetch", event = ?event, "fetch");
                if let sdkube_store::ProgressEvent::Plan {
                    bytes_to_download, ..
                } = &event
                {
                    self.update_if(generation, |s| {
                        s.progress = Some(FetchProgress {
                            done_bytes: 0,
                            total_bytes: *bytes_to_download,
                        })
                    });
                }
                if let sdkube_store::ProgressEvent::FileProgress { file, bytes, .. } = &event {
                    let done: u64 = {
                        let mut m = lock(&per_file);
                        m.insert(file.clone(), *bytes);
                        m.values().sum()
                    };
                    self.update_if(generation, |s| {
                        if let Some(p) = &mut s.progress {
                            p.done_bytes = done;
                            p.total_bytes = p.total_bytes.max(done);
                        }
                    });
                }
            })
            .map_err(|e| e.to_string())?;
            store
                .model_path(name)
                .ok_or_else(|| format!("{name} was fetched but is not in the store"))
        })();
        self.update_if(generation, |s| match result {
            Ok(path) => {
                s.path = Some(path);
                s.state = ModelState::Loading;
                s.message = Some(format!("loading {}", s.name));
            }
            Err(e) => {
                s.state = ModelState::Failed;
                s.message = Some(format!("fetching {} failed: {e}", s.name));
            }
        });
    }

    /// Applies `f` to the selection of `generation`, unless a newer one replaced it.
    fn update_if(&self, generation: u64, f: impl FnOnce(&mut ModelStatus)) {
        let mut slot = lock(&self.slot);
        if let Some(t) = slot.target.as_mut().filter(|t| t.generation == generation) {
            f(t);
        } else if slot.served.generation == generation {
            f(&mut slot.served);
        }
    }

    /// What a worker is doing with `generation` (loading, warming up), for `/readyz`.
    pub fn doing(&self, generation: u64, message: String) {
        self.update_if(generation, |s| s.message = Some(message));
    }

    /// A worker finished loading `generation` (and warming up, taking `warm_up` seconds);
    /// once every worker has, it serves.
    pub fn loaded(&self, generation: u64, family: &str, warm_up: Option<f64>) {
        let workers = self.workers;
        self.update_if(generation, |s| {
            s.loaded_by += 1;
            s.family = Some(family.to_string());
            if let Some(w) = warm_up {
                s.warm_up_seconds = Some(s.warm_up_seconds.map_or(w, |v| v.max(w)));
            }
            if s.loaded_by >= workers {
                s.state = ModelState::Ready;
                s.message = None;
            }
        });
        let mut slot = lock(&self.slot);
        if slot
            .target
            .as_ref()
            .is_some_and(|t| t.state == ModelState::Ready)
        {
            slot.served = slot.target.take().expect("checked above");
        }
    }

    /// A worker could not load `generation`.
    pub fn failed(&self, generation: u64, message: String) {
        self.update_if(generation, |s| {
            s.state = ModelState::Failed;
            s.message = Some(message);
        });
    }
}
