//! The gallery: images saved as A1111 names them (`00012-<seed>.png`, numbered on), and the
//! pages read back from it. One trait, two places: the outputs folder of one process
//! ([`FolderGallery`]), or Redis for several replicas (`crate::redis::RedisGallery`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::Serialize;
use utoipa::ToSchema;

#[async_trait]
pub trait Gallery: Send + Sync {
    /// Saves a PNG under the next free number; returns its name.
    async fn save(&self, png: Vec<u8>, seed: Option<u64>) -> std::io::Result<String>;
    /// A saved image's bytes (None for an unsafe or unknown name).
    async fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>>;
    /// Newest first, `per_page` items of page `page` (1-based).
    async fn page(&self, page: usize, per_page: usize) -> std::io::Result<GalleryPage>;
    /// Where images go, for messages and A1111's `outdir_samples`.
    fn location(&self) -> String;
}

/// The outputs folder of one process.
pub struct FolderGallery {
    dir: PathBuf,
    /// Serialises numbering between workers.
    next: Mutex<Option<u32>>,
}

/// One saved image, for the gallery.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GalleryItem {
    pub name: String,
    pub url: String,
    /// A1111 "parameters" text stored in the PNG.
    pub infotext: Option<String>,
    pub width: u32,
    pub height: u32,
    /// RFC 3339 time the file was written.
    pub created: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GalleryPage {
    pub items: Vec<GalleryItem>,
    pub page: usize,
    pub per_page: usize,
    pub total: usize,
}

/// A name the outputs folder may serve: `[A-Za-z0-9._-]+.png`, no leading dot. Anything
/// else (slashes, `..`, encoded separators) can never reach the filesystem.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.ends_with(".png")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl FolderGallery {
    /// The gallery of the PNGs in `dir` (created on the first save).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            next: Mutex::new(None),
        }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a PNG under the next free number; the file appears complete (temp + rename).
    pub fn save(&self, png: &[u8], seed: Option<u64>) -> std::io::Result<String> {
        let mut next = crate::lock(&self.next);
        std::fs::create_dir_all(&self.dir)?;
        let mut n = match *next {
            Some(n) => n,
            None => self.highest_index()?.map_or(0, |n| n + 1),
        };
        loop {
            let name = match seed {
                Some(s) => format!("{n:05}-{s}.png"),
                None => format!("{n:05}.png"),
            };
            let path = self.dir.join(&name);
            if path.exists() {
                n += 1;
                continue;
            }
            let tmp = self.dir.join(format!(".{name}.partial"));
            std::fs::write(&tmp, png)?;
            std::fs::rename(&tmp, &path)?;
            *next = Some(n + 1);
            return Ok(name);
        }
    }

    fn highest_index(&self) -> std::io::Result<Option<u32>> {
        let mut best = None;
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .split(['-', '.'])
                .next()
                .and_then(|n| n.parse::<u32>().ok())
            {
                best = best.max(Some(n));
            }
        }
        Ok(best)
    }

    /// The path of a saved image, if `name` is safe and exists.
    pub fn path_of(&self, name: &str) -> Option<PathBuf> {
        if !is_safe_name(name) {
            return None;
        }
        let p = self.dir.join(name);
        p.is_file().then_some(p)
    }

    /// Newest first, `per_page` items of page `page` (1-based).
    pub fn gallery(&self, page: usize, per_page: usize) -> std::io::Result<GalleryPage> {
        let mut files: Vec<(SystemTime, String)> = Vec::new();
        if self.dir.is_dir() {
            for entry in std::fs::read_dir(&self.dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !is_safe_name(&name) {
                    continue;
                }
                let modified = entry
                    .metadata()?
                    .modified()
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                files.push((modified, name));
            }
        }
        files.sort_by(|a, b| b.cmp(a));
        let total = files.len();
        let items = files
            .into_iter()
            .skip((page.max(1) - 1).saturating_mul(per_page))
            .take(per_page)
            .map(|(modified, name)| {
                let bytes = std::fs::read(self.dir.join(&name)).unwrap_or_default();
                describe(name, &bytes, modified)
            })
            .collect();
        Ok(GalleryPage {
            items,
            page: page.max(1),
            per_page,
            total,
        })
    }
}

#[async_trait]
impl Gallery for FolderGallery {
    async fn save(&self, png: Vec<u8>, seed: Option<u64>) -> std::io::Result<String> {
        FolderGallery::save(self, &png, seed)
    }

    async fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match self.path_of(name) {
            Some(path) => tokio::fs::read(&path).await.map(Some),
            None => Ok(None),
        }
    }

    async fn page(&self, page: usize, per_page: usize) -> std::io::Result<GalleryPage> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || FolderGallery::new(dir).gallery(page, per_page))
            .await
            .map_err(std::io::Error::other)?
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }
}

/// A gallery item's fields read from its PNG bytes.
pub fn describe(name: String, bytes: &[u8], created: SystemTime) -> GalleryItem {
    let infotext = sdkube_pipeline::image_io::read_png_parameters(bytes)
        .ok()
        .flatten();
    let (width, height) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .unwrap_or((0, 0));
    GalleryItem {
        url: format!("/outputs/{name}"),
        name,
        infotext,
        width,
        height,
        created: humantime::format_rfc3339_seconds(created).to_string(),
    }
}
