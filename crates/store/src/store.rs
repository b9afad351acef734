//! The model store: a directory (the chart's volume) holding `<root>/<model>/<file>` and a
//! manifest of what is present and verified.
//!
//! A file becomes visible under its final name only by an atomic rename after its sha256 was
//! checked; downloads in progress are `<file>.partial` (+ `<file>.partial.json`, the resume
//! state). `manifest.json` is replaced atomically (write a temporary file, fsync, rename).
//! Writers take `<root>/.lock` (an OS file lock, released by the kernel when a process dies),
//! so two fetchers on one shared volume run one after the other and never interleave.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::check_relative_path;

const MANIFEST: &str = "manifest.json";
const LOCK: &str = ".lock";

/// A problem with the store directory itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot create store directory").
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// `manifest.json` cannot be parsed.
    #[error("manifest {path} is corrupt ({message}); move it away and run `sdkube models verify`")]
    CorruptManifest {
        /// The manifest.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The model is not in the store.
    #[error("model {0:?} is not in the store")]
    NotPresent(String),
}

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// What the manifest says about the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of `manifest.json`.
    pub version: u32,
    /// The models present, by name.
    pub models: BTreeMap<String, StoredModel>,
}

/// A model present in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredModel {
    /// Its complete, verified files.
    pub files: Vec<StoredFile>,
}

/// One complete, verified file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// Path relative to the model directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
    /// The catalog source it came from ([`crate::FileSource::key`]).
    pub source: String,
    /// The URL it was downloaded from.
    pub url: String,
    /// RFC 3339 UTC time of the download.
    pub fetched_at: String,
}

/// Result of re-hashing one stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileCheck {
    /// The model.
    pub model: String,
    /// The file, relative to the model's directory.
    pub path: String,
    /// What was found.
    pub status: FileStatus,
}

/// A stored file against its manifest entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum FileStatus {
    /// As recorded.
    Ok,
    /// Gone.
    Missing,
    /// Another size than recorded.
    WrongSize {
        /// Bytes recorded.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },
    /// Another sha256 than recorded.
    WrongHash {
        /// The sha256 recorded.
        expected: String,
        /// The sha256 found.
        actual: String,
    },
}

/// A model store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Held while writing to the store; dropping it releases the lock.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err("cannot create store directory", &root))?;
        Ok(Store { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a model's files (which may not exist yet).
    pub fn model_dir(&self, model: &str) -> PathBuf {
        self.root.join(model)
    }

    /// The final path of a model's file (which may not exist yet).
    pub fn file_path(&self, model: &str, rel: &str) -> PathBuf {
        self.model_dir(model).join(rel)
    }

    /// The path to use for a model that is present and verified: its file when it has exactly
    /// one, its directory otherwise. `None` when absent, incomplete or changed on disk (size).
    pub fn model_path(&self, name: &str) -> Option<PathBuf> {
        let manifest = self.manifest().ok()?;
        let model = manifest.models.get(name)?;
        if model.files.is_empty() {
            return None;
        }
        for file in &model.files {
            let meta = fs::metadata(self.file_path(name, &file.path)).ok()?;
            if !meta.is_file() || meta.len() != file.size {
                return None;
            }
        }
        Some(match model.files.as_slice() {
            [only] => self.file_path(name, &only.path),
            _ => self.model_dir(name),
        })
    }

    /// Reads the manifest (empty when the store is new).
    pub fn manifest(&self) -> Result<Manifest, StoreError> {
        let path = self.root.join(MANIFEST);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::CorruptManifest {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Manifest {
                version: 1,
                models: BTreeMap::new(),
            }),
            Err(e) => Err(io_err("cannot read", &path)(e)),
        }
    }

    /// Replaces the manifest atomically. Call with the lock held.
    pub(crate) fn write_manifest(
        &self,
        manifest: &Manifest,
        _lock: &StoreLock,
    ) -> Result<(), StoreError> {
        let path = self.root.join(MANIFEST);
        let tmp = self.root.join(".manifest.json.tmp");
        let bytes = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        let mut file = File::create(&tmp).map_err(io_err("cannot write", &tmp))?;
        file.write_all(&bytes)
            .and_then(|_| file.sync_all())
            .map_err(io_err("cannot write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("cannot replace", &path))?;
        sync_dir(&self.root);
        Ok(())
    }

    /// Takes the store's write lock without waiting; `None` when another process holds it.
    pub fn try_lock(&self) -> Result<Option<StoreLock>, StoreError> {
        let path = self.root.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("cannot open lock file", &path))?;
        match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
            Ok(true) => Ok(Some(StoreLock { _file: file })),
            Ok(false) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(io_err("cannot lock", &path)(e)),
        }
    }

    /// Takes the store's write lock, waiting for another holder (blocking).
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        loop {
            if let Some(lock) = self.try_lock()? {
                return Ok(lock);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Re-hashes every stored file of `names` (all models when empty) against the manifest.
    /// Files that fail are deleted and dropped from the manifest, so `fetch` replaces them.
    pub fn verify(&self, names: &[String]) -> Result<Vec<FileCheck>, StoreError> {
        let manifest = self.manifest()?;
        let mut checks = Vec::new();
        for (name, model) in &manifest.models {
            if !names.is_empty() && !names.contains(name) {
                continue;
            }
            for file in &model.files {
                let path = self.file_path(name, &file.path);
                let status = match fs::metadata(&path) {
                    Err(_) => FileStatus::Missing,
                    Ok(meta) if meta.len() != file.size => FileStatus::WrongSize {
                        expected: file.size,
                        actual: meta.len(),
                    },
                    Ok(_) => {
                        let actual = sha256_file(&path).map_err(io_err("cannot read", &path))?;
                        if actual == file.sha256 {
                            FileStatus::Ok
                        } else {
                            FileStatus::WrongHash {
                                expected: file.sha256.clone(),
                                actual,
                            }
                        }
                    }
                };
                checks.push(FileCheck {
                    model: name.clone(),
                    path: file.path.clone(),
                    status,
                });
            }
        }
        for name in names {
            if !manifest.models.contains_key(name) {
                return Err(StoreError::NotPresent(name.clone()));
            }
        }
        let bad: Vec<&FileCheck> = checks
            .iter()
            .filter(|c| c.status != FileStatus::Ok)
            .collect();
        if !bad.is_empty() {
            // Keep the store's promise (a visible file is a verified file): forget and delete
            // what failed, so the next fetch downloads it again.
            let lock = self.lock()?;
            let mut manifest = self.manifest()?;
            for check in &bad {
                if let Some(model) = manifest.models.get_mut(&check.model) {
                    model.files.retain(|f| f.path != check.path);
                }
            }
            manifest.models.retain(|_, m| !m.files.is_empty());
            self.write_manifest(&manifest, &lock)?;
            for check in &bad {
                let path = self.file_path(&check.model, &check.path);
                if path.exists() {
                    fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
                }
            }
        }
        Ok(checks)
    }

    /// Removes a model's files, partial downloads and manifest entry (waits for the lock).
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let lock = self.lock()?;
        let mut manifest = self.manifest()?;
        let dir = self.model_dir(name);
        let known = manifest.models.remove(name).is_some();
        if !known && !dir.exists() {
            return Err(StoreError::NotPresent(name.to_owned()));
        }
        // The manifest first: a crash in between leaves stray files, never a manifest entry
        // pointing at files that are gone.
        self.write_manifest(&manifest, &lock)?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err("cannot remove", &dir))?;
        }
        Ok(())
    }

    /// Records a verified file in the manifest (replacing an entry of the same path).
    pub(crate) fn record(
        &self,
        model: &str,
        file: StoredFile,
        lock: &StoreLock,
    ) -> Result<(), StoreError> {
        check_relative_path(&file.path).map_err(|m| StoreError::CorruptManifest {
            path: self.root.join(MANIFEST),
            message: m,
        })?;
        let mut manifest = self.manifest()?;
        manifest.version = 1;
        let entry = manifest.models.entry(model.to_owned()).or_default();
        entry.files.retain(|f| f.path != file.path);
        entry.files.push(file);
        entry.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.write_manifest(&manifest, lock)
    }
}

/// sha256 of a whole file, lower-case hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path` (statvfs's
/// `f_bavail`: space reserved for root does not count). The fetcher's free-space check and
/// `sdkube doctor --local` both ask this.
pub fn free_space(path: &Path) -> io::Result<u64> {
    fs4::available_space(path)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes a rename durable; best effort (not every filesystem allows opening directories).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(path: &str, content: &[u8]) -> StoredFile {
        StoredFile {
            path: path.into(),
            size: content.len() as u64,
            sha256: hex(&Sha256::digest(content)),
            source: "test".into(),
            url: "http://test/".into(),
            fetched_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn model_path_verify_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("models")).unwrap();
        assert_eq!(store.model_path("m"), None);
        fs::create_dir_all(store.model_dir("m")).unwrap();
        fs::write(store.file_path("m", "a.bin"), b"hello").unwrap();
        let lock = store.lock().unwrap();
        store.record("m", stored("a.bin", b"hello"), &lock).unwrap();
        drop(lock);
        assert_eq!(store.model_path("m"), Some(store.file_path("m", "a.bin")));
        assert_eq!(store.verify(&[]).unwrap()[0].status, FileStatus::Ok);

        // Same size, different bytes: only a full verify notices.
        fs::write(store.file_path("m", "a.bin"), b"hell").unwrap();
        assert_eq!(store.model_path("m"), None, "size changed: not usable");
        fs::write(store.file_path("m", "a.bin"), b"jello").unwrap();
        assert_eq!(store.model_path("m"), Some(store.file_path("m", "a.bin")));
        assert!(matches!(
            store.verify(&["x".into()]),
            Err(StoreError::NotPresent(_))
        ));
        // Same size, different bytes: only a full verify notices, and removes it.
        assert!(matches!(
            store.verify(&["m".into()]).unwrap()[0].status,
            FileStatus::WrongHash { .. }
        ));
        assert!(!store.file_path("m", "a.bin").exists());
        assert_eq!(store.model_path("m"), None);
        assert!(store.manifest().unwrap().models.is_empty());

        fs::write(store.file_path("m", "a.bin"), b"hello").unwrap();
        let lock = store.lock().unwrap();
        store.record("m", stored("a.bin", b"hello"), &lock).unwrap();
        drop(lock);

        store.remove("m").unwrap();
        assert!(!store.model_dir("m").exists());
        assert!(store.manifest().unwrap().models.is_empty());
        assert!(matches!(store.remove("m"), Err(StoreError::NotPresent(_))));
    }

    #[test]
    fn lock_is_exclusive_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path()).unwrap();
        let b = Store::open(dir.path()).unwrap();
        let held = a.try_lock().unwrap().expect("first lock");
        assert!(b.try_lock().unwrap().is_none());
        drop(held);
        assert!(b.try_lock().unwrap().is_some());
    }

    #[test]
    fn corrupt_manifest_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join(MANIFEST), b"{not json").unwrap();
        assert!(matches!(
            store.manifest(),
            Err(StoreError::CorruptManifest { .. })
        ));
    }
}
