//! `sdkube serve` as a process: JSON logs, readiness, and a graceful shutdown on SIGTERM that
//! finishes the running job and fails the queued one cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    sdkube_testkit::repo_root()
}

/// One HTTP/1.1 request with `Connection: close`; (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[test]
fn serve_logs_json_and_shuts_down_gracefully_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdkube"))
        .args([
            "--log-json",
            "serve",
            "--device",
            "cpu",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--model")
        .arg(repo().join("fixtures/sd/sd1"))
        .arg("--store")
        .arg(dir.path().join("store"))
        .arg("--outputs")
        .arg(dir.path().join("outputs"))
        .args([
            "--max-steps",
            "2000",
            "--max-size",
            "256",
            "--shutdown-grace",
            "60",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server starts");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is JSON ({e}): {line}"));
        lines.push(line);
        if let Some(a) = v["fields"]["address"].as_str() {
            break a.to_string();
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&addr, "GET", "/readyz", "").0 != 200 {
        assert!(Instant::now() < deadline, "ready in time");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A long job runs, a second one waits behind it.
    let running = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            http(
                &addr,
                "POST",
                "/sdapi/v1/txt2img",
                r#"{"prompt": "x", "steps": 1000, "width": 64, "height": 64}"#,
            )
        })
    };
    loop {
        let (_, p) = http(&addr, "GET", "/sdapi/v1/progress", "");
        let p: serde_json::Value = serde_json::from_str(&p).unwrap();
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let queued = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            http(
                &addr,
                "POST",
                "/sdapi/v1/txt2img",
                r#"{"prompt": "y", "steps": 2, "width": 64, "height": 64}"#,
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let (status, body) = queued.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shut down before this job started"), "{body}");
    let (status, body) = running.join().unwrap();
    assert_eq!(status, 200, "the running job finished: {body}");
    assert!(body.contains("\"images\":[\""), "{body}");
    let started = Instant::now();
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "exits after the job"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{code:?}");
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_ok(),
            "{line}"
        );
        lines.push(line);
    }
    assert!(lines.iter().any(|l| l.contains("shutting down")));
    // One access-log line per request, as JSON.
    let access = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["path"] == "/sdapi/v1/txt2img" && v["fields"]["status"] == 200)
        .expect("an access-log line for the finished txt2img request");
    assert_eq!(access["fields"]["method"], "POST");
    assert!(access["fields"]["ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn serve_refuses_bad_settings_with_a_clear_message() {
    for (args, want) in [
        (vec!["--listen", "nowhere"], "--listen"),
        (vec!["--precision", "bf16", "--device", "cpu"], "bf16"),
        (vec!["--basic-auth", "justuser"], "user:password"),
        (vec!["--device", "tpu"], "unknown device"),
        (vec!["--max-steps", "0"], "--max-steps must be at least 1"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sdkube"))
            .arg("serve")
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
