//! Model catalog, model store and the fetcher.
//!
//! - [`Catalog`]: named models (built-in `catalog.toml` plus an optional user file).
//! - [`Store`]: `<root>/<model>/<file>` plus `manifest.json`; files appear only complete and
//!   verified; a file lock serialises writers sharing a volume.
//! - [`fetch()`]: Hugging Face hub protocol and plain URLs, proxies, retries, resume, parallel
//!   ranges, sha256 verification, free-space check; progress as [`ProgressEvent`]s.

mod catalog;
mod direct;
mod fetch;
mod net;
mod store;

pub use catalog::{Catalog, CatalogError, FileSource, FileSpec, ModelEntry};
pub use fetch::{
    fetch, fetch_blocking, FetchError, FetchOptions, FetchReport, FreeSpaceProbe, HumanBytes,
    ProgressEvent,
};
pub use net::ProxyConfig;
pub use store::{
    free_space, sha256_file, FileCheck, FileStatus, Manifest, Store, StoreError, StoreLock,
    StoredFile, StoredModel,
};
