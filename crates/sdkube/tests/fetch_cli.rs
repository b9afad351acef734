//! `sdkube fetch` and `sdkube models` as the Helm chart's init container runs them:
//! the binary against a small hub on loopback, environment variables included.
//! (The fault-injection and protocol tests live in crates/store/tests/fetch.rs.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const BODY: &[u8] = b"not really a checkpoint, but bytes with a known sha256\n";

/// A hub that serves one small (non-LFS) file, `acme/tiny` `model.safetensors`, answering
/// origin-form and proxy (absolute-form) requests alike, and records every request line.
/// With `token`, requests need `Authorization: Bearer <token>`.
struct TinyHub {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl TinyHub {
    fn start(token: Option<&'static str>) -> TinyHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let log = log.clone();
                std::thread::spawn(move || answer(stream, token, &log));
            }
        });
        TinyHub { addr, requests }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn answer(mut stream: TcpStream, token: Option<&str>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorised = token.is_none();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let (Some(t), Some(value)) = (token, line.strip_prefix("authorization: ")) {
            authorised |= value.trim() == format!("Bearer {t}");
        }
    }
    log.lock().unwrap().push(request_line.trim().to_owned());
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = match target.strip_prefix("http://") {
        Some(rest) => &rest[rest.find('/').unwrap_or(rest.len())..],
        None => target,
    };
    let (status, body): (&str, &[u8]) = if !authorised {
        ("401 Unauthorized", b"gated")
    } else if path == "/acme/tiny/resolve/main/model.safetensors" {
        ("200 OK", BODY)
    } else {
        ("404 Not Found", b"no")
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body);
    }
    let _ = stream.write_all(&response);
    let _ = stream.flush();
    let mut rest = Vec::new();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = reader.read_to_end(&mut rest);
}

fn sha256_hex(data: &[u8]) -> String {
    // The binary computes it; the test states the value it expects from an independent tool.
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(data)?;
            child.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn write_catalog(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("catalog.toml");
    std::fs::write(
        &path,
        format!(
            "[[model]]\nname = \"tiny\"\nkind = \"checkpoint\"\ndescription = \"test\"\n\
             [[model.file]]\nhub = \"acme/tiny\"\npath = \"model.safetensors\"\nsha256 = \"{}\"\n",
            sha256_hex(BODY)
        ),
    )
    .unwrap();
    path
}

/// The binary with a clean environment for the variables it reads.
fn sdkube(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdkube"));
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT",
        "SDKUBE_STORE",
        "SDKUBE_CATALOG",
        "SDKUBE_MODELS",
        "SDKUBE_PROGRESS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("SDKUBE_STORE", dir.join("store"));
    cmd.env("SDKUBE_CATALOG", write_catalog(dir));
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[test]
fn init_container_flow_fetch_twice_list_verify_remove() {
    let hub = TinyHub::start(None);
    let dir = tempfile::tempdir().unwrap();
    let fetch = || {
        sdkube(dir.path())
            .args(["fetch", "tiny", "--progress", "json"])
            .env("HF_ENDPOINT", hub.endpoint())
            .output()
            .unwrap()
    };
    let out = fetch();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let events = json_lines(&out);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "file_done" && e["file"] == "model.safetensors"),
        "{}",
        text(&out)
    );
    assert_eq!(events.last().unwrap()["event"], "done");
    let stored = dir.path().join("store/tiny/model.safetensors");
    assert_eq!(std::fs::read(&stored).unwrap(), BODY);

    // The init container runs again on every pod restart: no request at all.
    let before = hub.requests().len();
    let out = fetch();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(hub.requests().len(), before);
    assert!(json_lines(&out)
        .iter()
        .any(|e| e["event"] == "file_present"));

    let out = sdkube(dir.path())
        .args(["models", "list", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let models = json_lines(&out);
    let tiny = models.iter().find(|m| m["name"] == "tiny").unwrap();
    assert_eq!(tiny["present"], true);
    let sdxl = models.iter().find(|m| m["name"] == "sdxl-base").unwrap();
    assert_eq!(sdxl["present"], false);
    assert_eq!(sdxl["size"], 6938078334u64);

    let out = sdkube(dir.path())
        .args(["models", "verify"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Same size, different bytes: verify fails (exit 1) and takes the file out of use.
    let mut corrupt = BODY.to_vec();
    corrupt[0] ^= 1;
    std::fs::write(&stored, &corrupt).unwrap();
    let out = sdkube(dir.path())
        .args(["models", "verify", "tiny"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CORRUPT"),
        "{}",
        text(&out)
    );
    assert!(!stored.exists());
    let out = fetch();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(std::fs::read(&stored).unwrap(), BODY);

    let out = sdkube(dir.path())
        .args(["models", "remove", "tiny"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!stored.exists());
    let out = sdkube(dir.path())
        .args(["models", "remove", "tiny"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn unknown_model_is_a_usage_error_naming_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let out = sdkube(dir.path())
        .args(["fetch", "sd-9", "--progress", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let events = json_lines(&out);
    assert_eq!(events[0]["event"], "error");
    assert!(
        events[0]["message"].as_str().unwrap().contains("sdxl-base"),
        "{}",
        text(&out)
    );
}

#[test]
fn gated_repo_exit_2_with_a_hint_then_hf_token_works() {
    let hub = TinyHub::start(Some("hf_test"));
    let dir = tempfile::tempdir().unwrap();
    let out = sdkube(dir.path())
        .args(["fetch", "tiny", "--progress", "none"])
        .env("HF_ENDPOINT", hub.endpoint())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HF_TOKEN"),
        "{}",
        text(&out)
    );
    let out = sdkube(dir.path())
        .args(["fetch", "tiny", "--progress", "bar"])
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_TOKEN", "hf_test")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// The hub's name does not resolve; only the proxy can reach it. Lower-case `http_proxy`
/// must be honoured, and `no_proxy` must send the request direct (where it fails).
#[test]
fn lower_case_http_proxy_is_honoured_and_no_proxy_bypasses_it() {
    let proxy = TinyHub::start(None);
    let dir = tempfile::tempdir().unwrap();
    let out = sdkube(dir.path())
        .args(["fetch", "tiny", "--progress", "none"])
        .env("HF_ENDPOINT", "http://hub.invalid")
        .env("http_proxy", proxy.endpoint())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let requests = proxy.requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.contains(" http://hub.invalid/acme/tiny/resolve/main/")),
        "absolute-form requests through the proxy: {requests:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let seen = proxy.requests().len();
    let out = sdkube(dir.path())
        .args(["fetch", "tiny", "--progress", "none", "--retries", "0"])
        .env("HF_ENDPOINT", "http://hub.invalid")
        .env("http_proxy", proxy.endpoint())
        .env("no_proxy", "localhost,hub.invalid")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        proxy.requests().len(),
        seen,
        "no_proxy host must not go through the proxy"
    );
}
