//! The model catalog: named models and where each of their files comes from.
//!
//! The built-in catalog is `crates/store/catalog.toml`, compiled into the binary; a user file
//! in the same format adds models or replaces built-in ones of the same name.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const BUILT_IN: &str = include_str!("../catalog.toml");

/// A problem with a catalog file.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The catalog file cannot be read.
    #[error("cannot read catalog {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The catalog is not TOML.
    #[error("catalog {origin} is not valid TOML: {message}")]
    Parse {
        /// Which catalog (built-in or a file).
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// A model entry is not usable.
    #[error("catalog {origin}, model {model:?}: {problem}")]
    Invalid {
        /// Which catalog (built-in or a file).
        origin: String,
        /// The model.
        model: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// All models sdkube knows by name.
#[derive(Debug, Clone, Serialize)]
pub struct Catalog {
    models: Vec<ModelEntry>,
}

/// One named model: what `sdkube fetch NAME` downloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelEntry {
    /// The name `sdkube fetch` and `--model` take.
    pub name: String,
    /// What the model is for: checkpoint, upscaler, face-restorer, face-detector, ...
    pub kind: String,
    /// One line for listings.
    pub description: String,
    /// Its files.
    pub files: Vec<FileSpec>,
}

/// One file (or, with a pattern, a set of files) of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSpec {
    /// Where it comes from.
    pub source: FileSource,
    /// Size in bytes, when known in advance.
    pub size: Option<u64>,
    /// Lower-case hex sha256, when known in advance.
    pub sha256: Option<String>,
}

/// Where a file comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileSource {
    /// One file of a Hugging Face repo (`{endpoint}/{repo}/resolve/{revision}/{path}`).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// Path in the repository; also the path in the model's directory.
        path: String,
    },
    /// Every file of a Hugging Face repo whose path matches a glob (`*` and `?`).
    HubPattern {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// The glob paths must match.
        pattern: String,
    },
    /// A plain http(s) URL, stored as `file_name`.
    Url {
        /// The URL.
        url: String,
        /// The name in the model's directory.
        file_name: String,
    },
}

impl FileSource {
    /// A stable text form, recorded in the manifest to recognise what a stored file came from.
    pub fn key(&self) -> String {
        match self {
            FileSource::Hub {
                repo,
                revision,
                path,
            } => format!("hf://{repo}@{revision}/{path}"),
            FileSource::HubPattern {
                repo,
                revision,
                pattern,
            } => format!("hf://{repo}@{revision}/{pattern}"),
            FileSource::Url { url, .. } => url.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    model: Vec<RawModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    file: Vec<RawFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    hub: Option<String>,
    revision: Option<String>,
    path: Option<String>,
    pattern: Option<String>,
    url: Option<String>,
    file_name: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
}

impl Catalog {
    /// The built-in catalog, plus `user_file` when given (its models replace built-in ones of
    /// the same name and are otherwise appended).
    pub fn load(user_file: Option<&Path>) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog::parse(BUILT_IN, "built-in")?;
        if let Some(path) = user_file {
            let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
                path: path.to_owned(),
                source,
            })?;
            let user = Catalog::parse(&text, &path.display().to_string())?;
            for model in user.models {
                match catalog.models.iter_mut().find(|m| m.name == model.name) {
                    Some(existing) => *existing = model,
                    None => catalog.models.push(model),
                }
            }
        }
        Ok(catalog)
    }

    /// Parses catalog text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog = toml::from_str(text).map_err(|e| CatalogError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        let mut models: Vec<ModelEntry> = Vec::new();
        for raw_model in raw.model {
            let invalid = |problem: String| CatalogError::Invalid {
                origin: origin.to_owned(),
                model: raw_model.name.clone(),
                problem,
            };
            check_model_name(&raw_model.name).map_err(invalid)?;
            if models.iter().any(|m| m.name == raw_model.name) {
                return Err(invalid("defined twice".into()));
            }
            if raw_model.file.is_empty() {
                return Err(invalid("has no [[model.file]]".into()));
            }
            let mut files = Vec::new();
            for raw_file in &raw_model.file {
                files.push(file_spec(raw_file).map_err(invalid)?);
            }
            models.push(ModelEntry {
                name: raw_model.name.clone(),
                kind: raw_model.kind.clone(),
                description: raw_model.description.clone(),
                files,
            });
        }
        Ok(Catalog { models })
    }

    /// Every model, in catalog order.
    pub fn models(&self) -> &[ModelEntry] {
        &self.models
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// Model names become directory names in the store, so they are kept to a safe alphabet.
fn check_model_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(
            "model names may use only letters, digits, '.', '-' and '_' and may not start with '.'"
                .into(),
        )
    }
}

/// A relative path inside a model directory: no absolute paths, no `..`, no empty segments.
pub(crate) fn check_relative_path(path: &str) -> Result<(), String> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || path.ends_with(".partial")
        || path.ends_with(".partial.json");
    if bad {
        Err(format!("{path:?} is not a safe relative file path"))
    } else {
        Ok(())
    }
}

fn check_sha256(sha: &str) -> Result<String, String> {
    let lower = sha.to_ascii_lowercase();
    if lower.len() == 64 && lower.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(lower)
    } else {
        Err(format!("sha256 {sha:?} is not 64 hex digits"))
    }
}

fn file_spec(raw: &RawFile) -> Result<FileSpec, String> {
    let sha256 = raw.sha256.as_deref().map(check_sha256).transpose()?;
    let source = match (&raw.hub, &raw.url) {
        (Some(repo), None) => {
            if raw.file_name.is_some() {
                return Err("file_name is only for url sources".into());
            }
            if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
                return Err(format!("hub repo {repo:?} is not of the form owner/name"));
            }
            let revision = raw.revision.clone().unwrap_or_else(|| "main".into());
            match (&raw.path, &raw.pattern) {
                (Some(path), None) => {
                    check_relative_path(path)?;
                    FileSource::Hub {
                        repo: repo.clone(),
                        revision,
                        path: path.clone(),
                    }
                }
                (None, Some(pattern)) => {
                    if raw.size.is_some() || sha256.is_some() {
                        return Err("size and sha256 belong to single files, not patterns".into());
                    }
                    FileSource::HubPattern {
                        repo: repo.clone(),
                        revision,
                        pattern: pattern.clone(),
                    }
                }
                _ => return Err("a hub file needs exactly one of `path` or `pattern`".into()),
            }
        }
        (None, Some(url)) => {
            if raw.path.is_some() || raw.pattern.is_some() || raw.revision.is_some() {
                return Err("path, pattern and revision are only for hub sources".into());
            }
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(format!("url {url:?} is not http(s)"));
            }
            let file_name = match &raw.file_name {
                Some(name) => name.clone(),
                None => url_file_name(url).ok_or_else(|| {
                    format!("cannot take a file name from {url:?}; set file_name")
                })?,
            };
            check_relative_path(&file_name)?;
            FileSource::Url {
                url: url.clone(),
                file_name,
            }
        }
        _ => return Err("a file needs exactly one of `hub` or `url`".into()),
    };
    Ok(FileSpec {
        source,
        size: raw.size,
        sha256,
    })
}

fn url_file_name(url: &str) -> Option<String> {
    let without_query = url.split(['?', '#']).next()?;
    let after_scheme = without_query.split_once("://")?.1;
    let (_, path) = after_scheme.split_once('/')?;
    let last = path.rsplit('/').next()?;
    (!last.is_empty()).then(|| last.to_owned())
}

/// Glob match with `*` (any run of characters, `/` included) and `?` (one character).
pub(crate) fn glob_matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_catalog_has_the_issue_3_models_with_valid_entries() {
        let catalog = Catalog::load(None).unwrap();
        for name in [
            "sd-1.5",
            "sd-2.1",
            "sdxl-base",
            "sd-turbo",
            "sdxl-turbo",
            "realesrgan-x4plus",
            "realesrgan-x4plus-anime",
            "realesr-general-x4v3",
            "gfpgan-1.3",
            "gfpgan-1.4",
            "retinaface-resnet50",
        ] {
            let model = catalog
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert!(!model.files.is_empty());
        }
        // Every built-in file has a hash: nothing is stored unverified. The exceptions are hub
        // LFS files whose hash could not be read where the entry was written; the fetcher
        // verifies those against the hub's X-Linked-Etag (the LFS oid, a sha256).
        const HASH_FROM_HUB: &[&str] = &[
            "depth-anything-small",
            "control-v11p-sd15-canny",
            "control-v11f1p-sd15-depth",
            "control-v11p-sd15-openpose",
            "control-v11f1e-sd15-tile",
            "controlnet-canny-sdxl",
            "controlnet-depth-sdxl",
        ];
        for model in catalog.models() {
            for file in &model.files {
                if HASH_FROM_HUB.contains(&model.name.as_str()) {
                    assert!(
                        matches!(file.source, FileSource::Hub { .. }),
                        "{}: only hub files may take their hash from the hub",
                        model.name
                    );
                    continue;
                }
                assert!(file.sha256.is_some(), "{} has no sha256", model.name);
            }
        }
    }

    #[test]
    fn user_file_overrides_and_extends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.toml");
        std::fs::write(
            &path,
            r#"
[[model]]
name = "sd-1.5"
[[model.file]]
url = "https://example.com/a/my-sd15.safetensors?download=1"

[[model]]
name = "my-lora-pack"
[[model.file]]
hub = "me/loras"
pattern = "*.safetensors"
"#,
        )
        .unwrap();
        let catalog = Catalog::load(Some(&path)).unwrap();
        let sd = catalog.get("sd-1.5").unwrap();
        assert_eq!(
            sd.files[0].source,
            FileSource::Url {
                url: "https://example.com/a/my-sd15.safetensors?download=1".into(),
                file_name: "my-sd15.safetensors".into()
            }
        );
        let pack = catalog.get("my-lora-pack").unwrap();
        assert_eq!(
            pack.files[0].source.key(),
            "hf://me/loras@main/*.safetensors"
        );
        assert!(catalog.get("sdxl-base").is_some());
    }

    #[test]
    fn bad_entries_are_rejected_with_the_model_named() {
        let cases = [
            ("[[model]]\nname = \"../x\"\n[[model.file]]\nurl = \"https://a/b\"", "letters"),
            ("[[model]]\nname = \"x\"\n[[model.file]]\nurl = \"https://a/b\"\nsha256 = \"abc\"", "64 hex"),
            ("[[model]]\nname = \"x\"\n[[model.file]]\nhub = \"a/b\"\npath = \"../../etc/passwd\"", "safe relative"),
            ("[[model]]\nname = \"x\"\n[[model.file]]\nhub = \"a/b\"", "exactly one of `path`"),
            ("[[model]]\nname = \"x\"\n[[model.file]]\nurl = \"ftp://a/b\"", "not http"),
            ("[[model]]\nname = \"x\"", "no [[model.file]]"),
            ("[[model]]\nname = \"x\"\nbogus = 1", "bogus"),
        ];
        for (text, needle) in cases {
            let err = Catalog::parse(text, "test").unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn glob() {
        assert!(glob_matches("*.safetensors", "unet/model.safetensors"));
        assert!(glob_matches("unet/*.bin", "unet/a.bin"));
        assert!(!glob_matches("unet/*.bin", "vae/a.bin"));
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("a?c", "abbc"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("*.pth", "model.pth.partial"));
    }
}
