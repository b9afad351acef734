//! `doctor --local` checks against real files, a real loopback HTTP server and the real
//! dynamic linker.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use sdkube_doctor::local::{
    check_cuda, check_endpoint, check_free_disk, check_gpu, check_local, check_store,
    summarise_proxy, LocalOptions, Route, DEFAULT_HUB,
};
use sdkube_doctor::{FindingCode, Severity};

#[test]
fn gpu_device_nodes_are_recognised_and_their_absence_is_a_warning() {
    let dev = tempfile::tempdir().unwrap();
    assert_eq!(check_gpu(dev.path()).severity, Severity::Warning);
    // Control nodes are not GPUs.
    std::fs::write(dev.path().join("nvidiactl"), b"").unwrap();
    std::fs::write(dev.path().join("nvidia-uvm"), b"").unwrap();
    assert_eq!(check_gpu(dev.path()).severity, Severity::Warning);
    std::fs::write(dev.path().join("nvidia0"), b"").unwrap();
    std::fs::write(dev.path().join("nvidia1"), b"").unwrap();
    let found = check_gpu(dev.path());
    assert_eq!(found.severity, Severity::Info);
    assert!(found.title.contains("nvidia0, nvidia1"), "{}", found.title);
}

#[test]
fn cuda_library_that_cannot_load_is_an_error_only_with_a_gpu() {
    let missing = vec!["libsdkube-no-such-cuda.so.1".to_owned()];
    let with_gpu = check_cuda(&missing, true);
    assert_eq!(with_gpu[0].severity, Severity::Error);
    assert!(
        with_gpu[0].evidence[0]
            .message
            .contains("libsdkube-no-such-cuda.so.1"),
        "{:?}",
        with_gpu[0].evidence
    );
    assert_eq!(check_cuda(&missing, false)[0].severity, Severity::Info);
    // A library every Linux machine has loads the same way.
    let libc = vec!["libc.so.6".to_owned()];
    assert_eq!(check_cuda(&libc, true)[0].severity, Severity::Info);
}

/// The CUDA image's libcuda.so.1 stand-in (no driver mounted) loads, but must not
/// pass for the driver. Built here from a one-line C file with the system compiler.
#[test]
fn the_cuda_images_libcuda_stand_in_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("stub.c");
    std::fs::write(&source, "const char sdkube_no_driver[] = \"no driver\";\nint cuInit(int f) { (void)f; return 34; }\n").unwrap();
    let library = dir.path().join("libcuda.so.1");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .expect("a C compiler (cargo's linker) is present");
    assert!(built.success());
    let path = vec![library.display().to_string()];
    let without_gpu = &check_cuda(&path, false)[0];
    assert_eq!(without_gpu.severity, Severity::Info);
    assert!(
        without_gpu
            .title
            .ends_with("is sdkube's stand-in: no NVIDIA driver in this container"),
        "{}",
        without_gpu.title
    );
    let with_gpu = &check_cuda(&path, true)[0];
    assert_eq!(with_gpu.severity, Severity::Error);
    assert!(
        with_gpu.fix.advice.contains("NVIDIA container toolkit"),
        "{}",
        with_gpu.fix.advice
    );
}

#[test]
fn store_writability_is_probed_without_leaving_files() {
    let dir = tempfile::tempdir().unwrap();
    let ok = check_store(dir.path());
    assert_eq!(ok.severity, Severity::Info, "{}", ok.title);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "probe file removed"
    );
    let not_yet = check_store(&dir.path().join("models/sub"));
    assert_eq!(not_yet.severity, Severity::Info);
    assert!(
        not_yet.title.contains("does not exist yet"),
        "{}",
        not_yet.title
    );
}

#[test]
fn read_only_store_is_an_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("ro");
    std::fs::create_dir(&store).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = store.join("probe");
    let root = std::fs::write(&probe, b"x").is_ok(); // root ignores modes: nothing to test then
    let _ = std::fs::remove_file(&probe);
    if !root {
        let finding = check_store(&store);
        assert_eq!(finding.severity, Severity::Error, "{}", finding.title);
        assert!(
            finding.evidence[0].message.contains("ermission denied"),
            "{:?}",
            finding.evidence
        );
    }
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn free_disk_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let free = sdkube_doctor::local::free_bytes(dir.path()).unwrap();
    assert!(free > 0);
    assert_eq!(check_free_disk(dir.path(), 1).severity, Severity::Info);
    let short = check_free_disk(dir.path(), u64::MAX);
    assert_eq!(short.severity, Severity::Warning);
    assert!(short.title.starts_with("Only "), "{}", short.title);
}

#[test]
fn proxy_summary_hides_passwords_and_tokens() {
    let env = vec![
        (
            "HTTPS_PROXY".to_owned(),
            "http://alice:s3cret@192.168.6.200:3128".to_owned(),
        ),
        ("HF_TOKEN".to_owned(), "hf_abcdef".to_owned()),
    ];
    let finding = summarise_proxy(&env);
    let shown: Vec<&str> = finding
        .evidence
        .iter()
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(shown, ["http://alice:***@192.168.6.200:3128", "(set)"]);
}

#[test]
fn options_take_hf_endpoint_and_proxy_from_the_environment() {
    let options = LocalOptions::from_lookup("/tmp/store".into(), |k| match k {
        "HF_ENDPOINT" => Some("https://hf-mirror.example".into()),
        "no_proxy" => Some("localhost".into()),
        _ => None,
    });
    assert_eq!(options.endpoint, "https://hf-mirror.example");
    assert_eq!(options.proxy_env.len(), 2);
    let default = LocalOptions::from_lookup("/tmp/store".into(), |_| None);
    assert_eq!(default.endpoint, DEFAULT_HUB);
}

/// A one-request HTTP server on loopback that records the request line.
fn one_shot_server(status_line: &'static str) -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 2048];
        let n = stream.read(&mut buf).unwrap();
        let request = String::from_utf8_lossy(&buf[..n]).into_owned();
        write!(
            stream,
            "{status_line}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        request.lines().next().unwrap_or_default().to_owned()
    });
    (url, handle)
}

#[test]
fn hub_reachable_means_any_http_answer_to_a_head_request() {
    let (url, server) = one_shot_server("HTTP/1.1 401 Unauthorized");
    let finding = check_endpoint(&url, Duration::from_secs(5), Route::Direct);
    assert_eq!(finding.severity, Severity::Info, "{}", finding.title);
    assert!(finding.title.contains("HTTP 401"), "{}", finding.title);
    assert_eq!(server.join().unwrap(), "HEAD / HTTP/1.1");
}

#[test]
fn hub_unreachable_is_an_error_with_proxy_and_mirror_fixes() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let finding = check_endpoint(
        &format!("http://127.0.0.1:{port}"),
        Duration::from_secs(2),
        Route::Direct,
    );
    assert_eq!(finding.severity, Severity::Error);
    assert_eq!(finding.code, FindingCode::LocalHub);
    assert!(finding
        .fix
        .values
        .as_deref()
        .unwrap()
        .contains("hfEndpoint"));
}

#[test]
fn all_local_checks_run() {
    let store = tempfile::tempdir().unwrap();
    let (url, server) = one_shot_server("HTTP/1.1 200 OK");
    let mut options = LocalOptions::from_lookup(store.path().to_path_buf(), |_| None);
    options.endpoint = url;
    options.dev_dir = store.path().to_path_buf();
    options.route = Route::Direct; // independent of the test machine's proxy
    let findings = check_local(&options);
    server.join().unwrap();
    let codes: Vec<FindingCode> = findings.iter().map(|f| f.code).collect();
    // one finding per CUDA library the CUDA build loads
    let mut expected = vec![FindingCode::LocalGpu];
    expected.extend([FindingCode::LocalCuda; sdkube_doctor::local::CUDA_LIBRARIES.len()]);
    expected.extend([
        FindingCode::LocalStore,
        FindingCode::LocalDisk,
        FindingCode::LocalProxy,
        FindingCode::LocalHub,
    ]);
    assert_eq!(codes, expected);
}
