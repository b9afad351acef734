//! LoRA in generation: A1111's extra-network prompt tags (`<lora:name>`, `<lora:name:w>`,
//! `<lora:name:te:unet>`, `te=`/`unet=`), the folders of LoRA files (`--lora-dirs`), and the
//! patched weights a job's networks are built from.
//!
//! The tags are read as A1111's `extensions-builtin/Lora/extra_networks_lora.py` reads them:
//! the first number is the text-encoder multiplier, the second the UNet's (default: the
//! first). They are removed from the prompt before it is tokenized; a name no folder has is
//! an error naming it (A1111 only warns, which leaves users wondering why nothing changed).
//!
//! A LoRA's weights are never merged into the loaded model: [`LoraNetworks`] builds a network
//! from the engine's base weights (put on the device once with `--vram high`) with
//! the touched tensors replaced by `W + Σ w·ΔW` ([`sdkube_models::lora::patch`]). Switching
//! LoRAs therefore costs the deltas of the touched tensors and the rebuild of the networks
//! they belong to (no copy of untouched weights), never a model load.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdkube_models::blocks::ProjectionStacks;
use sdkube_models::clip::ClipTextModel;
use sdkube_models::ldm::TensorMap;
use sdkube_models::lora::{self, BoundLora, LoraFile, Part};
use sdkube_models::unet::UNet2DConditionModel;
use sdkube_models::SdWeights;
use sha2::{Digest, Sha256};

use crate::Error;

/// File extensions scanned for LoRAs (A1111's list).
pub const EXTENSIONS: [&str; 3] = ["safetensors", "pt", "ckpt"];

/// One `<lora:…>` tag of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The LoRA's name (file stem, or the alias from its metadata).
    pub name: String,
    /// Multiplier of its text-encoder deltas.
    pub te: f64,
    /// Multiplier of its UNet deltas.
    pub unet: f64,
}

fn tag_regex() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    // A1111's `re_extra_net`.
    RE.get_or_init(|| regex::Regex::new(r"<(\w+):([^>]+)>").expect("valid regex"))
}

fn parse_tag(args: &str) -> Result<LoraTag, String> {
    let mut positional = Vec::new();
    let mut named = HashMap::new();
    for a in args.split(':') {
        match a.split_once('=') {
            Some((k, v)) => {
                named.insert(k.trim(), v.trim());
            }
            None => positional.push(a.trim()),
        }
    }
    let name = positional.first().copied().unwrap_or("").to_string();
    if name.is_empty() {
        return Err("no LoRA name".into());
    }
    let number = |s: &str| {
        s.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("`{s}` is not a multiplier"))
    };
    let mut te = positional.get(1).map_or(Ok(1.0), |s| number(s))?;
    if let Some(v) = named.remove("te") {
        te = number(v)?;
    }
    let mut unet = positional.get(2).map_or(Ok(te), |s| number(s))?;
    if let Some(v) = named.remove("unet") {
        unet = number(v)?;
    }
    if positional.len() > 3 || !named.is_empty() {
        return Err("only `name`, `te` and `unet` are supported (no `dyn`)".into());
    }
    Ok(LoraTag { name, te, unet })
}

/// The prompt without its `<lora:…>` (or `<lyco:…>`) tags, and the tags. Other extra-network
/// tags stay in the text.
pub fn extract_tags(prompt: &str) -> Result<(String, Vec<LoraTag>), Error> {
    let mut tags = Vec::new();
    let mut bad = None;
    let text = tag_regex().replace_all(prompt, |c: &regex::Captures| {
        if &c[1] != "lora" && &c[1] != "lyco" {
            return c[0].to_string();
        }
        match parse_tag(&c[2]) {
            Ok(t) => tags.push(t),
            Err(why) => bad = Some(format!("bad LoRA tag {}: {why}", &c[0])),
        }
        String::new()
    });
    match bad {
        Some(msg) => Err(Error::Invalid(msg)),
        None => Ok((text.into_owned(), tags)),
    }
}

/// The tags of a prompt, or none when it has bad ones (batching compares these).
pub fn tags_of(prompt: &str) -> Vec<LoraTag> {
    extract_tags(prompt).map(|(_, t)| t).unwrap_or_default()
}

/// What the API lists about a LoRA file (A1111's `/sdapi/v1/loras` fields).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraInfo {
    /// File stem: the name a prompt tag uses.
    pub name: String,
    /// `ss_output_name` from the metadata, else the name; tags may use it too.
    pub alias: String,
    /// The file.
    pub path: PathBuf,
    /// The safetensors header's `__metadata__`, values that are JSON objects parsed (as A1111).
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

type Stamp = (u64, Option<SystemTime>);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()))
}

/// The LoRA files under some folders (subfolders included, hidden entries skipped).
#[derive(Debug, Default)]
pub struct LoraLibrary {
    dirs: Vec<PathBuf>,
    /// Single files under given names (LoRAs fetched into the model store, by catalog name).
    files: Vec<(String, PathBuf)>,
    entries: Vec<LoraInfo>,
    hashes: Mutex<HashMap<PathBuf, (Stamp, String)>>,
}

impl LoraLibrary {
    /// Scans `dirs` (missing folders list nothing).
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self::with_files(dirs, Vec::new())
    }

    /// Scans `dirs`, and lists `files` under their given names after the folders' files (LoRAs
    /// fetched into the model store, by catalog name).
    pub fn with_files(dirs: Vec<PathBuf>, files: Vec<(String, PathBuf)>) -> Self {
        let mut lib = Self {
            dirs,
            files,
            ..Self::default()
        };
        lib.refresh();
        lib
    }

    /// The folders scanned.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Scans the folders again (A1111's `refresh-loras`).
    pub fn refresh(&mut self) {
        let mut files = Vec::new();
        for dir in &self.dirs {
            scan(dir, &mut files);
        }
        files.sort();
        let stem = |p: &Path| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let named = files
            .into_iter()
            .map(|p| (stem(&p), p))
            .chain(self.files.iter().filter(|(_, p)| p.is_file()).cloned());
        let mut entries: Vec<LoraInfo> = Vec::new();
        for (name, path) in named {
            if entries.iter().any(|e| e.name == name) {
                tracing::warn!(path = %path.display(), "LoRA name already used by another file");
                continue;
            }
            let raw = lora::read_metadata(&path).unwrap_or_default();
            let alias = raw
                .get("ss_output_name")
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| name.clone());
            let metadata = raw
                .into_iter()
                .map(|(k, v)| {
                    let parsed = v
                        .starts_with('{')
                        .then(|| serde_json::from_str(&v).ok())
                        .flatten();
                    (k, parsed.unwrap_or(serde_json::Value::String(v)))
                })
                .collect();
            entries.push(LoraInfo {
                name,
                alias,
                path,
                metadata,
            });
        }
        self.entries = entries;
    }

    /// Every LoRA found, by name.
    pub fn list(&self) -> &[LoraInfo] {
        &self.entries
    }

    /// The LoRA a tag names: by file name first, then by alias.
    pub fn get(&self, name: &str) -> Option<&LoraInfo> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .or_else(|| self.entries.iter().find(|e| e.alias == name))
    }

    /// Checks that every tag names a LoRA of the folders: the error names the first that
    /// does not.
    pub fn check(&self, tags: &[LoraTag]) -> Result<(), Error> {
        let Some(t) = tags.iter().find(|t| self.get(&t.name).is_none()) else {
            return Ok(());
        };
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        Err(Error::Invalid(format!(
            "unknown LoRA `{}` in the prompt: no such file in the LoRA folders ({})",
            t.name,
            if dirs.is_empty() {
                "none given: --lora-dirs".to_string()
            } else {
                dirs.join(", ")
            }
        )))
    }

    /// A1111's short hash of a LoRA file: the metadata's `sshs_model_hash`, else the sha256 of
    /// a safetensors file's tensor data (the bytes after the header: the "addnet" hash, so
    /// editing metadata keeps it) or of a whole other file; the first 12 hex digits.
    pub fn short_hash(&self, info: &LoraInfo) -> std::io::Result<String> {
        if let Some(serde_json::Value::String(h)) = info.metadata.get("sshs_model_hash") {
            return Ok(h.chars().take(12).collect());
        }
        let now = stamp(&info.path);
        let mut cache = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, h)) = cache.get(&info.path) {
            if Some(*s) == now {
                return Ok(h.clone());
            }
        }
        let hash = file_hash(&info.path)?;
        if let Some(s) = now {
            cache.insert(info.path.clone(), (s, hash.clone()));
        }
        Ok(hash)
    }
}

fn file_hash(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if safetensors {
        let mut len = [0u8; 8];
        f.read_exact(&mut len)?;
        f.seek(SeekFrom::Start(8 + u64::from_le_bytes(len)))?;
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn scan(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            scan(&path, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
}

/// LoRA files kept read and bound beyond the ones in use.
const MAX_BOUND: usize = 8;

/// One LoRA in use, at its multipliers.
#[derive(Debug, Clone)]
struct InUse {
    lora: Arc<BoundLora>,
    te: f64,
    unet: f64,
}

impl InUse {
    fn multiplier(&self, part: Part) -> f64 {
        if part.is_text() {
            self.te
        } else {
            self.unet
        }
    }
}

/// `map` on `device` in `dtype`; convolution weights channels-last where the convolutions
/// run so, as the layers would make them (shared, not copied per network).
fn upload(map: &TensorMap, device: &Device, dtype: DType) -> candle_core::Result<TensorMap> {
    let (names, tensors): (Vec<&String>, Vec<&Tensor>) = map.iter().unzip();
    let on_device = sdkube_nn::to_device_all(&tensors, device)?;
    names
        .into_iter()
        .zip(on_device)
        .map(|(k, t)| {
            let mut t = t.to_dtype(dtype)?;
            if t.rank() == 4 && sdkube_nn::channels_last_on(&t) {
                t = sdkube_nn::to_channels_last(&t)?;
            }
            Ok((k.clone(), t))
        })
        .collect()
}

/// LoRAs for one engine: the library, the files read and bound to its model, and the set in
/// use, patched into the engine's base weights as networks are built.
#[derive(Debug)]
pub struct LoraNetworks {
    library: LoraLibrary,
    bound: HashMap<PathBuf, (Option<Stamp>, Arc<BoundLora>)>,
    active: Vec<InUse>,
    /// The base weights (the engine's `SdWeights`) are on `device` in `dtype` and shared by
    /// every network built from them (`--vram high`).
    resident: bool,
    device: Device,
    dtype: DType,
}

impl LoraNetworks {
    /// No LoRAs yet; with `resident`, the base weights of the text encoders and the UNet are
    /// uploaded to `device` once, so that networks built from them share their memory, and
    /// become `weights`' own: the copies they replace (on the host, or read onto the device in
    /// their stored dtype and layout) would hold the memory twice, and a UNet built from
    /// `weights` (a training job's) fuses into the stacks instead of copying them.
    pub(crate) fn new(
        weights: &mut SdWeights,
        device: &Device,
        dtype: DType,
        resident: bool,
    ) -> Result<Self, Error> {
        // The maps are taken, not cloned: where a weight is on `device` in `dtype` already, the
        // upload keeps it, and stacking the UNet's q/k/v then frees each attention's three as
        // its stack is made (still held by `weights`, they would all stay until the networks
        // are built: SDXL's 614 MB beside their stacks).
        let up = |map: &mut TensorMap| upload(&std::mem::take(map), device, dtype);
        if resident {
            weights.unet.tensors = up(&mut weights.unet.tensors)?;
            weights.unet_stacks = ProjectionStacks::stack_on(&mut weights.unet.tensors, device)?;
            weights.text_encoder.tensors = up(&mut weights.text_encoder.tensors)?;
            if let Some(c) = weights.text_encoder_2.as_mut() {
                c.tensors = up(&mut c.tensors)?;
            }
        }
        Ok(Self {
            library: LoraLibrary::default(),
            bound: HashMap::new(),
            active: Vec::new(),
            resident,
            device: device.clone(),
            dtype,
        })
    }

    /// The LoRA files prompts may name.
    pub fn library(&self) -> &LoraLibrary {
        &self.library
    }

    pub(crate) fn set_library(&mut self, library: LoraLibrary) {
        // Files already bound stay (their size and time are checked before reuse).
        self.library = library;
    }

    pub(crate) fn refresh(&mut self) {
        self.library.refresh();
    }

    /// Checks that every tag names a known LoRA.
    pub(crate) fn check_names(&self, tags: &[LoraTag]) -> Result<(), Error> {
        self.library.check(tags)
    }

    /// A1111's "Lora hashes" entries (`name: hash`, the name as the prompt gives it, `:` and
    /// `,` removed) of `tags`.
    pub(crate) fn hashes(&self, tags: &[LoraTag]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in tags {
            let Some(info) = self.library.get(&t.name) else {
                continue;
            };
            let Ok(hash) = self.library.short_hash(info) else {
                continue;
            };
            let name: String = t.name.chars().filter(|c| *c != ':' && *c != ',').collect();
            let entry = format!("{name}: {hash}");
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
        out
    }

    fn resolve(&mut self, tags: &[LoraTag], weights: &SdWeights) -> Result<Vec<InUse>, Error> {
        self.check_names(tags)?;
        let mut out = Vec::with_capacity(tags.len());
        for t in tags {
            let Some(path) = self.library.get(&t.name).map(|i| i.path.clone()) else {
                continue; // checked above
            };
            let now = stamp(&path);
            let lora = match self.bound.get(&path) {
                Some((s, l)) if *s == now => l.clone(),
                _ => {
                    let file = LoraFile::read(&path).map_err(|e| Error::Invalid(e.to_string()))?;
                    let bound = Arc::new(
                        file.bind(weights)
                            .map_err(|e| Error::Invalid(e.to_string()))?,
                    );
                    self.bound.insert(path, (now, bound.clone()));
                    bound
                }
            };
            out.push(InUse {
                lora,
                te: t.te,
                unet: t.unet,
            });
        }
        Ok(out)
    }

    fn part_set(set: &[InUse], part: Part) -> Vec<(*const BoundLora, u64)> {
        set.iter()
            .filter(|u| u.lora.touches(part) && u.multiplier(part) != 0.0)
            .map(|u| (Arc::as_ptr(&u.lora), u.multiplier(part).to_bits()))
            .collect()
    }

    /// Makes `tags` the LoRAs in use; returns the parts whose networks must be rebuilt
    /// (only with resident networks; others are built per job anyway).
    pub(crate) fn activate(
        &mut self,
        tags: &[LoraTag],
        weights: &SdWeights,
    ) -> Result<Vec<Part>, Error> {
        let set = self.resolve(tags, weights)?;
        // Files read for earlier jobs stay bound for quick switching back, within a bound:
        // a LoRA can weigh hundreds of MB.
        if self.bound.len() > MAX_BOUND {
            let keep: Vec<&Path> = set.iter().map(|u| u.lora.path.as_path()).collect();
            self.bound.retain(|path, _| keep.contains(&path.as_path()));
        }
        let changed: Vec<Part> = [Part::TextEncoder, Part::TextEncoder2, Part::UNet]
            .into_iter()
            .filter(|p| Self::part_set(&set, *p) != Self::part_set(&self.active, *p))
            .collect();
        self.active = set;
        Ok(if self.resident { changed } else { Vec::new() })
    }

    /// The weights `part`'s network is built from: the base (device-resident or CPU) with the
    /// active LoRAs' tensors patched in.
    fn tensors(&self, weights: &SdWeights, part: Part) -> Result<TensorMap, Error> {
        let base = match part {
            Part::TextEncoder => &weights.text_encoder.tensors,
            Part::TextEncoder2 => &weights.text_encoder_2.as_ref().ok_or_else(no_te2)?.tensors,
            Part::UNet => &weights.unet.tensors,
        };
        let list: Vec<(&BoundLora, f64)> = self
            .active
            .iter()
            .map(|u| (u.lora.as_ref(), u.multiplier(part)))
            .collect();
        let mut map = base.clone();
        if !list.is_empty() {
            let started = Instant::now();
            let patched = lora::patch(base, part, &list, &self.device, self.dtype)?;
            tracing::debug!(
                ?part,
                tensors = patched.len(),
                seconds = started.elapsed().as_secs_f64(),
                "LoRA deltas"
            );
            map.extend(patched);
        }
        Ok(map)
    }

    /// A text encoder (`Part::TextEncoder` or `TextEncoder2`) with the active LoRAs.
    pub(crate) fn build_clip(
        &self,
        weights: &SdWeights,
        part: Part,
    ) -> Result<ClipTextModel, Error> {
        let config = match part {
            Part::TextEncoder2 => &weights.text_encoder_2.as_ref().ok_or_else(no_te2)?.config,
            _ => &weights.text_encoder.config,
        };
        let vb = VarBuilder::from_tensors(self.tensors(weights, part)?, self.dtype, &self.device);
        Ok(ClipTextModel::new(vb, config)?)
    }

    /// The UNet with the active LoRAs.
    pub(crate) fn build_unet(&self, weights: &SdWeights) -> Result<UNet2DConditionModel, Error> {
        let vb =
            VarBuilder::from_tensors(self.tensors(weights, Part::UNet)?, self.dtype, &self.device);
        // Resident weights' projections are views into these stacks (empty otherwise).
        Ok(UNet2DConditionModel::new_sharing(
            vb,
            &weights.unet.config,
            &weights.unet_stacks,
        )?)
    }
}

fn no_te2() -> Error {
    Error::Invalid("the model has no second text encoder".into())
}

/// Metadata of LoRA files by name, for listings that have no engine (an `api` replica).
pub fn list_dirs(dirs: &[PathBuf]) -> Vec<LoraInfo> {
    LoraLibrary::new(dirs.to_vec()).entries
}
