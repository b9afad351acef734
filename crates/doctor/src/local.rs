//! `sdkube doctor --local`: can this machine run sdkube? GPU, CUDA libraries, model store,
//! free disk, proxy environment, hub reachability.
//!
//! Passing checks are reported as `Info` findings (so the report shows what was checked);
//! failing ones as `Warning` or `Error`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::analyze::human_bytes;
use crate::finding::{Evidence, Finding, FindingCode, Fix, Severity};

/// The public hub, used when `HF_ENDPOINT` is unset.
pub const DEFAULT_HUB: &str = "https://huggingface.co";
/// Below this much free space the store cannot take an SDXL checkpoint and its VAE.
pub const MIN_FREE_BYTES: u64 = 10 * 1024 * 1024 * 1024;
/// The libraries sdkube's CUDA build links, by soname: the driver's, then CUDA 13's runtime,
/// cuBLAS/cuBLASLt, cuRAND, NVRTC and cuDNN 9 (what the CUDA image carries).
pub const CUDA_LIBRARIES: [&str; 7] = [
    "libcuda.so.1",
    "libcudart.so.13",
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libcurand.so.10",
    "libnvrtc.so.13",
    "libcudnn.so.9",
];
/// The symbol of the CUDA image's libcuda.so.1 stand-in (deploy/docker/cuda-wheels.sh), which
/// the loader finds only when no driver library is mounted.
const NO_DRIVER_SYMBOL: &[u8] = b"sdkube_no_driver\0";

/// What `--local` looks at; [`LocalOptions::from_env`] for the real machine.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The model store directory.
    pub store: PathBuf,
    /// The hub or mirror to reach (`HF_ENDPOINT`, else [`DEFAULT_HUB`]).
    pub endpoint: String,
    /// Longest wait for the hub's answer.
    pub timeout: Duration,
    /// Where GPU device nodes appear (`/dev`).
    pub dev_dir: PathBuf,
    /// The CUDA libraries that must load (sonames).
    pub cuda_libraries: Vec<String>,
    /// Less free space than this on the store's filesystem is a warning.
    pub min_free_bytes: u64,
    /// Proxy-related environment variables and their values.
    pub proxy_env: Vec<(String, String)>,
    /// How the hub check connects.
    pub route: Route,
}

const PROXY_VARIABLES: [&str; 10] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "HF_ENDPOINT",
    "HF_TOKEN",
];

impl LocalOptions {
    /// The options for this machine: the environment's hub, proxies and token.
    pub fn from_env(store: PathBuf) -> Self {
        Self::from_lookup(store, |k| std::env::var(k).ok())
    }

    /// The options with the environment read through `lookup` (tests).
    pub fn from_lookup(store: PathBuf, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let proxy_env = PROXY_VARIABLES
            .iter()
            .filter_map(|k| {
                lookup(k)
                    .filter(|v| !v.is_empty())
                    .map(|v| (k.to_string(), v))
            })
            .collect();
        Self {
            store,
            endpoint: lookup("HF_ENDPOINT")
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| DEFAULT_HUB.to_owned()),
            timeout: Duration::from_secs(5),
            dev_dir: PathBuf::from("/dev"),
            cuda_libraries: CUDA_LIBRARIES.iter().map(|s| s.to_string()).collect(),
            min_free_bytes: MIN_FREE_BYTES,
            proxy_env,
            route: Route::Environment,
        }
    }
}

/// Runs every local check.
pub fn check_local(options: &LocalOptions) -> Vec<Finding> {
    let gpu = check_gpu(&options.dev_dir);
    let has_gpu = gpu.severity == Severity::Info;
    let mut findings = vec![gpu];
    findings.extend(check_cuda(&options.cuda_libraries, has_gpu));
    findings.push(check_store(&options.store));
    findings.push(check_free_disk(&options.store, options.min_free_bytes));
    findings.push(summarise_proxy(&options.proxy_env));
    findings.push(check_endpoint(
        &options.endpoint,
        options.timeout,
        options.route,
    ));
    findings
}

fn info(code: FindingCode, title: impl Into<String>) -> Finding {
    Finding::new(code, Severity::Info, title, Fix::default())
}

/// NVIDIA device nodes (`nvidia0`, `nvidia1`, …) under `dev_dir`, and `nvidia-smi`'s view.
pub fn check_gpu(dev_dir: &Path) -> Finding {
    let mut devices: Vec<String> = std::fs::read_dir(dev_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.strip_prefix("nvidia")
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    devices.sort();
    if devices.is_empty() {
        return Finding::new(
            FindingCode::LocalGpu,
            Severity::Warning,
            format!("No NVIDIA GPU visible (no {}/nvidia[0-9]*): inference will run on the CPU, slowly", dev_dir.display()),
            Fix::advice("On a GPU machine, install the NVIDIA driver; in a container, run it with the NVIDIA container toolkit (`docker run --gpus all`); in Kubernetes, ask for a GPU.")
                .values("gpu:\n  count: 1"),
        );
    }
    let mut finding = info(
        FindingCode::LocalGpu,
        format!("GPU device(s) visible: {}", devices.join(", ")),
    );
    if let Some(smi) = nvidia_smi() {
        for line in smi {
            finding
                .evidence
                .push(Evidence::new("nvidia-smi", None, line));
        }
    }
    finding
}

fn nvidia_smi() -> Option<Vec<String>> {
    let output = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ])
        .output()
        .ok()?;
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    })
}

/// Whether each CUDA library can be loaded by the dynamic linker, as candle will.
pub fn check_cuda(libraries: &[String], has_gpu: bool) -> Vec<Finding> {
    libraries
        .iter()
        .map(|library| match load(library) {
            Ok(Loaded::Real) => info(FindingCode::LocalCuda, format!("{library} loads")),
            Ok(Loaded::NoDriverStandIn) => Finding::new(
                FindingCode::LocalCuda,
                if has_gpu { Severity::Error } else { Severity::Info },
                format!("{library} is sdkube's stand-in: no NVIDIA driver in this container"),
                Fix::advice(if has_gpu {
                    "GPU devices are visible but the driver's library is not: run the container with the NVIDIA container toolkit (`docker run --gpus all`, or the nvidia runtime class in Kubernetes), which mounts it."
                } else {
                    "Fine without a GPU (downloads, CPU inference); on a GPU node the NVIDIA container toolkit mounts the driver's libcuda.so.1, which then comes first."
                }),
            ),
            Err(err) => Finding::new(
                FindingCode::LocalCuda,
                if has_gpu { Severity::Error } else { Severity::Info },
                if has_gpu {
                    format!("{library} cannot be loaded")
                } else {
                    format!("{library} cannot be loaded (needed only with a GPU)")
                },
                Fix::advice(if library.starts_with("libcuda.") {
                    "libcuda comes with the NVIDIA driver: install the driver, or in a container mount it with the NVIDIA container toolkit."
                } else {
                    "Install the CUDA runtime (or use the sdkube CUDA image), and make it findable: ldconfig or LD_LIBRARY_PATH."
                })
                .command(format!("ldconfig -p | grep {}", library.split(".so").next().unwrap_or(library))),
            )
            .with_evidence(Evidence::new(library.clone(), Some("dlopen"), err)),
        })
        .collect()
}

enum Loaded {
    Real,
    /// The CUDA image's libcuda.so.1 that stands in for a missing driver.
    NoDriverStandIn,
}

// dlopen through libloading: its API is unsafe because loading runs the library's code.
#[allow(unsafe_code)]
fn load(library: &str) -> Result<Loaded, String> {
    if CString::new(library).is_err() {
        return Err("library name contains a NUL byte".to_owned());
    }
    // SAFETY: loading runs the library's initialisers. The CUDA libraries are the ones
    // candle itself loads; we look one symbol up, call nothing, and drop the handle.
    let loaded = unsafe { libloading::Library::new(library) };
    loaded
        .map(|lib| {
            // SAFETY: only the symbol's presence is checked; it is never dereferenced.
            match unsafe { lib.get::<*const u8>(NO_DRIVER_SYMBOL) } {
                Ok(_) => Loaded::NoDriverStandIn,
                Err(_) => Loaded::Real,
            }
        })
        .map_err(|e| {
            // libloading puts dlerror()'s text (which names the missing file) in the source.
            match std::error::Error::source(&e) {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            }
        })
}

/// Whether a file can be created in the store (or, if the store does not exist yet, whether
/// its nearest existing parent would let us create it).
pub fn check_store(store: &Path) -> Finding {
    let (dir, exists) = match nearest_existing(store) {
        Some(dir) => {
            let exists = dir == store;
            (dir, exists)
        }
        None => {
            return Finding::new(
                FindingCode::LocalStore,
                Severity::Error,
                format!(
                    "Model store {}: no part of the path exists",
                    store.display()
                ),
                Fix::advice("Create the store directory or pass --store."),
            )
        }
    };
    let probe = dir.join(format!(".sdkube-doctor-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map(|_| ());
    let _ = std::fs::remove_file(&probe);
    match written {
        Ok(()) if exists => info(FindingCode::LocalStore, format!("Model store {} is writable", store.display())),
        Ok(()) => info(
            FindingCode::LocalStore,
            format!("Model store {} does not exist yet; {} is writable, so it can be created", store.display(), dir.display()),
        ),
        Err(err) => Finding::new(
            FindingCode::LocalStore,
            Severity::Error,
            format!("Model store {} is not writable", store.display()),
            Fix::advice("Fix the directory's owner or mode, or pass another --store (in the chart: the volume must be writable by the pod's user).")
                .command(format!("ls -ld {}", dir.display())),
        )
        .with_evidence(Evidence::new(dir.display().to_string(), None, err.to_string())),
    }
}

fn nearest_existing(path: &Path) -> Option<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    absolute
        .ancestors()
        .find(|p| p.exists())
        .map(Path::to_path_buf)
}

/// Free bytes on the filesystem holding `path`: the same call as the fetcher's free-space
/// check, so the doctor and `sdkube fetch` never disagree.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    sdkube_store::free_space(path)
}

/// Whether the store's filesystem has `min_free` bytes free (the nearest existing ancestor's,
/// before the store exists).
pub fn check_free_disk(store: &Path, min_free: u64) -> Finding {
    let Some(dir) = nearest_existing(store) else {
        return info(
            FindingCode::LocalDisk,
            "Free disk not checked: the store path does not exist",
        );
    };
    match free_bytes(&dir) {
        Ok(free) if free >= min_free => info(
            FindingCode::LocalDisk,
            format!(
                "{} free on the store's filesystem",
                human_bytes(free as f64)
            ),
        ),
        Ok(free) => Finding::new(
            FindingCode::LocalDisk,
            Severity::Warning,
            format!(
                "Only {} free on the store's filesystem ({} needed for an SDXL model)",
                human_bytes(free as f64),
                human_bytes(min_free as f64)
            ),
            Fix::advice("Free space, or put the store on a bigger disk with --store.")
                .command(format!("df -h {}", dir.display())),
        ),
        Err(err) => Finding::new(
            FindingCode::LocalDisk,
            Severity::Warning,
            format!("Cannot read free space of {}", dir.display()),
            Fix::advice(err.to_string()),
        ),
    }
}

/// `http://user:secret@host:3128` → `http://user:***@host:3128`; tokens are never shown.
fn redact(key: &str, value: &str) -> String {
    if key == "HF_TOKEN" {
        return "(set)".to_owned();
    }
    match (value.find("://"), value.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &value[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &value[..scheme + 3], &value[at..]),
                None => value.to_owned(),
            }
        }
        _ => value.to_owned(),
    }
}

/// The proxy-related variables set, passwords and tokens masked.
pub fn summarise_proxy(env: &[(String, String)]) -> Finding {
    if env.is_empty() {
        return info(
            FindingCode::LocalProxy,
            "No proxy, HF_ENDPOINT or HF_TOKEN in the environment",
        );
    }
    let mut finding = info(FindingCode::LocalProxy, "Proxy and hub environment");
    for (key, value) in env {
        finding
            .evidence
            .push(Evidence::new(key.clone(), None, redact(key, value)));
    }
    finding
}

/// How the hub check connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Through the proxy the environment names (`HTTPS_PROXY`, `ALL_PROXY`…, minus `NO_PROXY`),
    /// as the fetcher does.
    Environment,
    /// Straight to the host.
    Direct,
}

/// HEAD request to the hub or mirror, with `timeout`. Any HTTP answer counts as reachable;
/// only a failure to get one is a problem.
pub fn check_endpoint(endpoint: &str, timeout: Duration, route: Route) -> Finding {
    let proxy = match route {
        Route::Environment => ureq::Proxy::try_from_env(),
        Route::Direct => None,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .proxy(proxy)
        .build()
        .into();
    match agent.head(endpoint).call() {
        Ok(response) => info(
            FindingCode::LocalHub,
            format!("{endpoint} answers (HTTP {})", response.status().as_u16()),
        ),
        Err(err) => Finding::new(
            FindingCode::LocalHub,
            Severity::Error,
            format!("{endpoint} cannot be reached"),
            Fix::advice("Set a proxy for the hub, or point HF_ENDPOINT at a reachable mirror (in the chart: proxy.* or hfEndpoint).")
                .command("export HTTPS_PROXY=http://<proxy>:3128")
                .command("export HF_ENDPOINT=https://<mirror>")
                .values("proxy:\n  https: http://<proxy>:3128\n# or\nhfEndpoint: https://<mirror>"),
        )
        .with_evidence(Evidence::new(endpoint, Some("HEAD"), err.to_string())),
    }
}
