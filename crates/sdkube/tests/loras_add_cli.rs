//! `sdkube loras add SOURCE` against a loopback server answering plain URLs and the Hugging
//! Face resolve endpoint (`/{repo}/resolve/{revision}/{path}`), and `sdkube loras list`.

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

fn sdkube(endpoint: &str, args: &[&str], store: &Path, dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdkube"))
        .args(args)
        .arg("--store")
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

/// coreutils' sha256sum of a file.
fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

#[test]
fn adds_loras_from_a_url_and_the_hub_and_refuses_what_is_not_one() {
    let kohya = std::fs::read(fixtures().join("lora/sd1/kohya-sd1.safetensors")).unwrap();
    let peft = std::fs::read(fixtures().join("lora/sd1/peft-sd1.safetensors")).unwrap();
    let not_lora = std::fs::read(fixtures().join("ti/sd1/tiembed.safetensors")).unwrap();
    let files = HashMap::from([
        ("/files/watercolor.safetensors".to_string(), kohya.clone()),
        ("/files/ti.safetensors".to_string(), not_lora),
        (
            "/someone/styles/resolve/v2/loras/peft-style.safetensors".to_string(),
            peft.clone(),
        ),
    ]);
    let (endpoint, log) = serve(files);
    let tmp = tempfile::tempdir().unwrap();
    let (store, dir) = (tmp.path().join("store"), tmp.path().join("loras"));

    let url = format!("{endpoint}/files/watercolor.safetensors");
    let sha = sha256_hex(&fixtures().join("lora/sd1/kohya-sd1.safetensors"));
    let out = sdkube(
        &endpoint,
        &["loras", "add", &url, "--sha256", &sha],
        &store,
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dir.join("watercolor.safetensors")).unwrap(),
        kohya
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("<lora:watercolor:1>"));

    let out = sdkube(
        &endpoint,
        &[
            "loras",
            "add",
            "someone/styles/loras/peft-style.safetensors@v2",
            "--name",
            "style",
        ],
        &store,
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.join("style.safetensors")).unwrap(), peft);
    // Verified files in the store cost no second download.
    let before = log.lock().unwrap().len();
    let out = sdkube(&endpoint, &["loras", "add", &url], &store, &dir);
    assert!(out.status.success());
    assert_eq!(
        log.lock().unwrap().len(),
        before,
        "{:?}",
        log.lock().unwrap()
    );

    // Not a LoRA, a wrong checksum: exit 2 / 1, nothing installed.
    let out = sdkube(
        &endpoint,
        &["loras", "add", &format!("{endpoint}/files/ti.safetensors")],
        &store,
        &dir,
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("emb_params"));
    assert!(!dir.join("ti.safetensors").exists());
    let bad = "0".repeat(64);
    let other = format!("{endpoint}/someone/styles/resolve/v2/loras/peft-style.safetensors");
    let out = sdkube(
        &endpoint,
        &["loras", "add", &other, "--name", "x", "--sha256", &bad],
        &store,
        &dir,
    );
    assert!(!out.status.success());
    assert!(!dir.join("x.safetensors").exists());

    // The list reads the folder as the server does.
    let out = Command::new(env!("CARGO_BIN_EXE_sdkube"))
        .args(["loras", "list", "--json", "--dirs"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["style", "watercolor"]);
    assert_eq!(list[1]["alias"], "kohya-sd1-alias");
}
