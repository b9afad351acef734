//! `sdkube embeddings add REPO` against a loopback server speaking the Hugging Face
//! resolve endpoint (`/{repo}/resolve/{revision}/{path}`), as an sd-concepts-library repo
//! is laid out.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use sdkube_testkit::fixtures;

/// Serves `files` (URL path → bytes) for GET and HEAD, one request per connection;
/// returns the endpoint and the log of request lines.
fn serve(files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
            }
            seen.lock().unwrap().push(request.trim().to_string());
            let mut parts = request.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let response = match files.get(path) {
                Some(body) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    if method == "GET" {
                        r.extend_from_slice(body);
                    }
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = stream.write_all(&response);
        }
    });
    (endpoint, log)
}

fn add(endpoint: &str, repo: &str, store: &Path, dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdkube"))
        .args(["embeddings", "add", repo, "--store"])
        .arg(store)
        .arg("--dir")
        .arg(dir)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .unwrap()
}

#[test]
fn fetches_a_concept_repo_into_the_embeddings_folder() {
    let learned = std::fs::read(fixtures().join("ti/formats/ti-diffusers.bin")).unwrap();
    let evil = std::fs::read(fixtures().join("ti/bad/evil.pt")).unwrap();
    let files = HashMap::from([
        (
            "/sd-concepts-library/tiny-toy/resolve/main/learned_embeds.bin".to_string(),
            learned.clone(),
        ),
        (
            "/sd-concepts-library/tiny-toy/resolve/main/token_identifier.txt".to_string(),
            b"<tiny-toy>".to_vec(),
        ),
        (
            "/someone/evil/resolve/main/learned_embeds.bin".to_string(),
            evil,
        ),
        (
            "/someone/evil/resolve/main/token_identifier.txt".to_string(),
            b"<evil>".to_vec(),
        ),
    ]);
    let (endpoint, log) = serve(files);
    let tmp = tempfile::tempdir().unwrap();
    let (store, dir) = (tmp.path().join("store"), tmp.path().join("embeddings"));

    let out = add(&endpoint, "sd-concepts-library/tiny-toy", &store, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let installed = dir.join("<tiny-toy>.bin");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        installed.display().to_string()
    );
    assert_eq!(std::fs::read(&installed).unwrap(), learned);
    assert!(
        stderr.contains("use it in a prompt as <tiny-toy>"),
        "{stderr}"
    );
    let requests = log.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .any(|r| r
                .starts_with("GET /sd-concepts-library/tiny-toy/resolve/main/learned_embeds.bin")),
        "{requests:?}"
    );

    // Adding it again is a no-op; the folder lists it under its token.
    let again = add(&endpoint, "sd-concepts-library/tiny-toy", &store, &dir);
    assert!(again.status.success());
    let list = Command::new(env!("CARGO_BIN_EXE_sdkube"))
        .args(["embeddings", "list", "--json", "--model"])
        .arg(fixtures().join("sd/sd1"))
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(doc["loaded"][0]["name"], "<tiny-toy>");

    // A repo whose pickle names a non-tensor global is refused and nothing is installed.
    let evil = add(&endpoint, "someone/evil", &store, &dir);
    assert_eq!(evil.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&evil.stderr).contains("not tensor data"));
    assert!(!dir.join("<evil>.bin").exists());

    // A missing repo fails with the server's answer, nothing installed.
    let missing = add(&endpoint, "nobody/nothing", &store, &dir);
    assert!(!missing.status.success());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}
