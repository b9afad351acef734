//! The fetcher against a hub-like server and CDN on loopback, with injected faults.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{content, sha256_hex, Fault, ForwardProxy, Hub, TestTls};
use sdkube_store::{
    fetch, Catalog, FetchError, FetchOptions, ModelEntry, ProgressEvent, ProxyConfig, Store,
};

const REPO: &str = "acme/diffusion";

fn options(hub: &Hub) -> FetchOptions {
    FetchOptions {
        hf_endpoint: hub.endpoint(),
        retry_base_delay: Duration::from_millis(5),
        retry_max_delay: Duration::from_millis(50),
        read_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(2),
        connections: 1,
        progress_interval: Duration::ZERO,
        ..FetchOptions::default()
    }
}

fn catalog(text: &str) -> Catalog {
    Catalog::parse(text, "test").unwrap()
}

fn entry(catalog: &Catalog, name: &str) -> ModelEntry {
    catalog.get(name).unwrap().clone()
}

/// A catalog with one LFS file of the hub repo; `sha` adds the expected hash.
fn one_file(path: &str, sha: Option<&str>) -> Vec<ModelEntry> {
    let sha_line = sha.map(|s| format!("sha256 = \"{s}\"")).unwrap_or_default();
    let c = catalog(&format!(
        "[[model]]\nname = \"m\"\n[[model.file]]\nhub = \"{REPO}\"\npath = \"{path}\"\n{sha_line}\n"
    ));
    vec![entry(&c, "m")]
}

/// Runs a fetch, collecting its events.
async fn run(
    store: &Store,
    entries: &[ModelEntry],
    options: &FetchOptions,
) -> (
    Result<sdkube_store::FetchReport, FetchError>,
    Vec<ProgressEvent>,
) {
    let events = Mutex::new(Vec::new());
    let result = fetch(store, entries, options, |e| events.lock().unwrap().push(e)).await;
    (result, events.into_inner().unwrap())
}

/// Every regular file under the store except bookkeeping (partials, state, manifest, lock).
fn visible_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                stack.push(p);
            } else if !(name.ends_with(".partial")
                || name.ends_with(".partial.json")
                || name == "manifest.json"
                || name == ".lock")
            {
                out.push(p);
            }
        }
    }
    out
}

/// The fetcher's invariant: a visible file is complete and has the right hash.
fn assert_nothing_corrupt_visible(store: &Store, expected: &[(&str, &[u8])]) {
    for path in visible_files(store.root()) {
        let rel = path
            .strip_prefix(store.root())
            .unwrap()
            .to_string_lossy()
            .to_string();
        let (_, data) = expected
            .iter()
            .find(|(r, _)| *r == rel)
            .unwrap_or_else(|| panic!("unexpected visible file {rel}"));
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk == *data, "{rel} is visible but corrupt");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_redirect_to_cdn_verified_and_second_run_sends_no_request() {
    let hub = Hub::start(None).await;
    let big = content(300_000, 1);
    let small = b"{\"model_type\": \"unet\"}".to_vec();
    let big_sha = hub.add(REPO, "weights.safetensors", big.clone(), true);
    hub.add(REPO, "config.json", small.clone(), false);
    let c = catalog(&format!(
        r#"
[[model]]
name = "m"
[[model.file]]
hub = "{REPO}"
path = "weights.safetensors"
[[model.file]]
hub = "{REPO}"
path = "config.json"
"#
    ));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("models")).unwrap();
    let (result, events) = run(&store, &[entry(&c, "m")], &options(&hub)).await;
    let report = result.unwrap();
    assert_eq!(report.files_downloaded, 2);
    assert_eq!(
        std::fs::read(store.file_path("m", "weights.safetensors")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read(store.file_path("m", "config.json")).unwrap(),
        small
    );
    // The sha256 came from X-Linked-Etag and is recorded; the small file's was computed.
    let manifest = store.manifest().unwrap();
    let files = &manifest.models["m"].files;
    let weights = files
        .iter()
        .find(|f| f.path == "weights.safetensors")
        .unwrap();
    assert_eq!(weights.sha256, big_sha);
    assert_eq!(weights.size, 300_000);
    assert!(hub.cdn_gets().len() == 1, "the LFS body came from the CDN");
    assert_eq!(store.model_path("m"), Some(store.model_dir("m")));
    assert!(events.iter().any(|e| matches!(e, ProgressEvent::Plan { files_to_download: 2, bytes_to_download, .. } if *bytes_to_download == 300_000 + small.len() as u64)));
    assert!(matches!(
        events.last(),
        Some(ProgressEvent::Done {
            files_downloaded: 2,
            ..
        })
    ));

    // Idempotence: the init container may run a hundred times and download once.
    let before = hub.requests();
    let (result, events) = run(&store, &[entry(&c, "m")], &options(&hub)).await;
    assert_eq!(result.unwrap().files_present, 2);
    assert_eq!(hub.requests(), before, "a second run must send no request");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, ProgressEvent::FilePresent { .. }))
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gated_repo_needs_hf_token_and_the_token_never_reaches_the_cdn() {
    let hub = Hub::start(Some("hf_secret")).await;
    let data = content(50_000, 2);
    hub.add(REPO, "w.safetensors", data.clone(), true);
    hub.gate(REPO);
    let entries = one_file("w.safetensors", None);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();

    let (result, _) = run(&store, &entries, &options(&hub)).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, FetchError::Denied { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    assert!(visible_files(store.root()).is_empty());

    let with_token = FetchOptions {
        hf_token: Some("hf_secret".into()),
        ..options(&hub)
    };
    run(&store, &entries, &with_token).await.0.unwrap();
    assert_eq!(
        std::fs::read(store.file_path("m", "w.safetensors")).unwrap(),
        data
    );
    // The CDN answers 400 to any Authorization header, so success already proves it; check
    // the log too.
    assert!(hub.cdn_gets().iter().all(|l| l.authorization.is_none()));
    assert!(hub
        .log()
        .iter()
        .any(|l| l.server == "hub" && l.authorization.as_deref() == Some("Bearer hf_secret")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_lists_the_repo_across_pages_and_fetches_the_matches() {
    let hub = Hub::start(None).await;
    let mut expected = Vec::new();
    for (i, name) in ["a.pth", "b.pth", "c.pth", "unet/d.pth"].iter().enumerate() {
        let data = content(10_000 + i, 10 + i as u64);
        hub.add(REPO, name, data.clone(), i % 2 == 0);
        expected.push((format!("m/{name}"), data));
    }
    hub.add(REPO, "README.md", b"# readme".to_vec(), false);
    let c = catalog(&format!(
        "[[model]]\nname = \"m\"\n[[model.file]]\nhub = \"{REPO}\"\npattern = \"*.pth\"\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&store, &[entry(&c, "m")], &options(&hub))
        .await
        .0
        .unwrap();
    assert_eq!(report.files_downloaded, 4);
    let pages = hub
        .log()
        .iter()
        .filter(|l| l.path.starts_with("/api/models/"))
        .count();
    assert_eq!(pages, 3, "5 entries at 2 per page");
    let refs: Vec<(&str, &[u8])> = expected
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    assert_nothing_corrupt_visible(&store, &refs);
    assert_eq!(
        visible_files(store.root()).len(),
        4,
        "README.md does not match"
    );

    let before = hub.requests();
    run(&store, &[entry(&c, "m")], &options(&hub))
        .await
        .0
        .unwrap();
    assert_eq!(
        hub.requests(),
        before,
        "no listing request either once verified"
    );
}

/// Faults the fetcher must ride out: the file arrives intact in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_and_the_result_is_intact() {
    let data = content(2_500_000, 3);
    let sha = sha256_hex(&data);
    // Drops at pseudo-random offsets (deterministic seed), server errors, rate limiting.
    let mut offsets = content(6, 99).into_iter().map(|b| b as usize * 1500 + 1);
    let cases: Vec<(&str, Vec<Fault>)> = vec![
        (
            "drops",
            (0..6)
                .map(|_| Fault::DropAfter(offsets.next().unwrap()))
                .collect(),
        ),
        (
            "500",
            vec![Fault::Status(500, None), Fault::Status(500, None)],
        ),
        ("503+retry-after", vec![Fault::Status(503, Some(1))]),
        ("429+retry-after", vec![Fault::Status(429, Some(1))]),
        ("stall", vec![Fault::StallAfter(100_000)]),
        (
            "mixed",
            vec![
                Fault::DropAfter(7),
                Fault::Status(502, None),
                Fault::StallAfter(0),
                Fault::DropAfter(2_499_990),
            ],
        ),
    ];
    for (name, faults) in cases {
        let hub = Hub::start(None).await;
        hub.add(REPO, "w.bin", data.clone(), true);
        hub.inject(faults.clone());
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let started = std::time::Instant::now();
        let (result, events) = run(&store, &one_file("w.bin", Some(&sha)), &options(&hub)).await;
        result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
        assert_eq!(
            std::fs::read(store.file_path("m", "w.bin")).unwrap(),
            data,
            "{name}"
        );
        let retries: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, ProgressEvent::Retry { .. }))
            .collect();
        assert_eq!(
            retries.len(),
            faults.len(),
            "{name}: one retry per fault: {retries:?}"
        );
        if name.contains("retry-after") {
            assert!(
                started.elapsed() >= Duration::from_millis(950),
                "{name}: Retry-After honoured"
            );
            assert!(matches!(
                retries[0],
                ProgressEvent::Retry { delay_ms: 1000, .. }
            ));
        }
        // After a drop, the next request resumes where the data stopped.
        if name == "drops" {
            let gets = hub.cdn_gets();
            assert!(
                gets[1..].iter().all(|g| g
                    .range
                    .as_deref()
                    .is_some_and(|r| !r.starts_with("bytes=0-"))),
                "{gets:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_are_a_checksum_error_and_nothing_is_visible() {
    let hub = Hub::start(None).await;
    let data = content(100_000, 4);
    let sha = hub.add(REPO, "w.bin", data.clone(), true);
    hub.inject([Fault::WrongBytes]);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (result, _) = run(&store, &one_file("w.bin", Some(&sha)), &options(&hub)).await;
    let err = result.unwrap_err();
    assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{err}");
    assert!(visible_files(store.root()).is_empty());
    assert!(
        !store.file_path("m", "w.bin.partial").exists(),
        "a corrupt download is discarded"
    );
    assert!(store.manifest().unwrap().models.is_empty());
    assert_eq!(store.model_path("m"), None);
    // The next run gets it right.
    run(&store, &one_file("w.bin", Some(&sha)), &options(&hub))
        .await
        .0
        .unwrap();
    assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_hash_that_contradicts_the_catalog_is_refused_before_downloading() {
    let hub = Hub::start(None).await;
    hub.add(REPO, "w.bin", content(1000, 5), true);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (result, _) = run(
        &store,
        &one_file("w.bin", Some(&"ab".repeat(32))),
        &options(&hub),
    )
    .await;
    assert!(matches!(result, Err(FetchError::HubHashMismatch { .. })));
    // Likewise a size that differs from the hub's X-Linked-Size.
    let sized = catalog(&format!(
        "[[model]]\nname = \"m\"\n[[model.file]]\nhub = \"{REPO}\"\npath = \"w.bin\"\nsize = 999\n"
    ));
    let (result, _) = run(&store, &[entry(&sized, "m")], &options(&hub)).await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::HubSizeMismatch {
                hub: 1000,
                catalog: 999,
                ..
            }
        ),
        "{err}"
    );
    assert!(hub.cdn_gets().is_empty());
    assert!(visible_files(store.root()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_failure_gives_up_then_the_next_run_resumes_from_the_partial_file() {
    let hub = Hub::start(None).await;
    let data = content(500_000, 6);
    let sha = hub.add(REPO, "w.bin", data.clone(), true);
    hub.inject([
        Fault::DropAfter(200_000),
        Fault::Status(500, None),
        Fault::Status(500, None),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let few_retries = FetchOptions {
        max_retries: 1,
        ..options(&hub)
    };
    let (result, _) = run(&store, &one_file("w.bin", Some(&sha)), &few_retries).await;
    assert!(
        matches!(result, Err(FetchError::GaveUp { .. })),
        "{:?}",
        result.err()
    );
    assert!(visible_files(store.root()).is_empty());
    assert!(
        store.file_path("m", "w.bin.partial").exists(),
        "partial kept for resume"
    );

    let gets_before = hub.cdn_gets().len();
    let (result, events) = run(&store, &one_file("w.bin", Some(&sha)), &options(&hub)).await;
    result.unwrap();
    assert!(
        events.iter().any(|e| matches!(
            e,
            ProgressEvent::FileStart {
                resumed_from: 200_000,
                ..
            }
        )),
        "{events:?}"
    );
    let resumed = &hub.cdn_gets()[gets_before];
    assert_eq!(resumed.range.as_deref(), Some("bytes=200000-499999"));
    assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
    assert!(!store.file_path("m", "w.bin.partial").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_use_parallel_ranges_and_fall_back_when_ranges_are_ignored() {
    let hub = Hub::start(None).await;
    let data = content(1_000_000, 7);
    let sha = hub.add(REPO, "w.bin", data.clone(), true);
    let ranged = FetchOptions {
        connections: 4,
        ranged_min_size: 100_000,
        ..options(&hub)
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // One of the four ranges also gets its connection dropped.
    hub.inject([Fault::DropAfter(10_000)]);
    run(&store, &one_file("w.bin", Some(&sha)), &ranged)
        .await
        .0
        .unwrap();
    assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
    let mut ranges: Vec<String> = hub
        .cdn_gets()
        .iter()
        .filter_map(|g| g.range.clone())
        .collect();
    ranges.sort();
    assert!(ranges.contains(&"bytes=0-249999".to_string()), "{ranges:?}");
    assert!(
        ranges.contains(&"bytes=750000-999999".to_string()),
        "{ranges:?}"
    );
    assert_eq!(
        hub.cdn_gets().len(),
        5,
        "four ranges plus one retry: {ranges:?}"
    );

    // A server that ignores Range: fall back to one stream, still correct.
    let hub = Hub::start(None).await;
    hub.add(REPO, "w.bin", data.clone(), true);
    hub.inject([Fault::IgnoreRange; 4]);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    run(
        &store,
        &one_file("w.bin", Some(&sha)),
        &FetchOptions {
            hf_endpoint: hub.endpoint(),
            ..ranged.clone()
        },
    )
    .await
    .0
    .unwrap();
    assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_enough_free_space_is_reported_before_any_download() {
    let hub = Hub::start(None).await;
    let sha = hub.add(REPO, "w.bin", content(2_500_000, 8), true);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let tight = FetchOptions {
        free_space: Some(Arc::new(|_: &Path| Ok(1_200_000))),
        ..options(&hub)
    };
    let (result, _) = run(&store, &one_file("w.bin", Some(&sha)), &tight).await;
    let message = result.unwrap_err().to_string();
    assert_eq!(
        message,
        format!("needs 2.5 MB, 1.2 MB free on {}", store.root().display())
    );
    assert!(hub.cdn_gets().is_empty());
    assert!(visible_files(store.root()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fetchers_on_one_store_download_once_and_never_collide() {
    let hub = Hub::start(None).await;
    let data = content(200_000, 9);
    let sha = hub.add(REPO, "w.bin", data.clone(), true);
    hub.throttle(Some(400_000)); // ~0.5 s per download, so the second surely overlaps
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(dir.path()).unwrap();
    let b = Store::open(dir.path()).unwrap();
    let entries = one_file("w.bin", Some(&sha));
    let opts = options(&hub);
    let first = run(&a, &entries, &opts);
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        run(&b, &entries, &opts).await
    };
    let ((ra, ea), (rb, eb)) = tokio::join!(first, second);
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.files_downloaded + rb.files_downloaded, 1);
    assert_eq!(ra.files_present + rb.files_present, 1);
    assert_eq!(
        hub.cdn_gets().len(),
        1,
        "the file was downloaded exactly once"
    );
    let waited = |events: &[ProgressEvent]| {
        events
            .iter()
            .any(|e| matches!(e, ProgressEvent::WaitingForLock { .. }))
    };
    assert!(waited(&eb) && !waited(&ea));
    assert_nothing_corrupt_visible(&a, &[("m/w.bin", &data)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_is_slow_but_correct_and_reports_progress() {
    let hub = Hub::start(None).await;
    let data = content(300_000, 10);
    let sha = hub.add(REPO, "w.bin", data.clone(), true);
    hub.throttle(Some(600_000));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (result, events) = run(&store, &one_file("w.bin", Some(&sha)), &options(&hub)).await;
    result.unwrap();
    let progress: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::FileProgress { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 5, "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(*progress.last().unwrap(), 300_000);
    assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_through_the_proxy_unless_no_proxy_matches() {
    let hub = Hub::start(None).await;
    let data = content(100_000, 11);
    let sha = hub.add(REPO, "w.bin", data.clone(), true);
    let proxy = ForwardProxy::start().await;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("a")).unwrap();
    let proxied = FetchOptions {
        proxy: ProxyConfig {
            http: Some(proxy.url()),
            ..Default::default()
        },
        ..options(&hub)
    };
    run(&store, &one_file("w.bin", Some(&sha)), &proxied)
        .await
        .0
        .unwrap();
    assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
    let targets = proxy.targets();
    assert!(targets.contains(&hub.hub_addr.to_string()), "{targets:?}");
    assert!(
        targets.contains(&hub.cdn_addr.to_string()),
        "redirect target proxied too: {targets:?}"
    );
    assert_eq!(
        targets.len(),
        hub.requests(),
        "every request went through the proxy"
    );

    // NO_PROXY for the loopback address: the proxy sees nothing.
    let seen = proxy.targets().len();
    let store = Store::open(dir.path().join("b")).unwrap();
    let bypassed = FetchOptions {
        proxy: ProxyConfig {
            http: Some(proxy.url()),
            no_proxy: Some("example.com,127.0.0.1".into()),
            ..Default::default()
        },
        ..options(&hub)
    };
    run(&store, &one_file("w.bin", Some(&sha)), &bypassed)
        .await
        .0
        .unwrap();
    assert_eq!(proxy.targets().len(), seen);

    // A dead proxy is a network error (retried, then reported), not a silent bypass.
    let store = Store::open(dir.path().join("c")).unwrap();
    let dead = FetchOptions {
        proxy: ProxyConfig {
            http: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        },
        max_retries: 1,
        ..options(&hub)
    };
    let (result, _) = run(&store, &one_file("w.bin", Some(&sha)), &dead).await;
    assert!(matches!(result, Err(FetchError::GaveUp { .. })));
}

/// The seed's situation: HTTPS only through a CONNECT proxy, and a CA of our own (a private
/// mirror, or a TLS-inspecting proxy) trusted through `ca_bundle` (`SDKUBE_CA_BUNDLE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_tunnelled_through_the_proxy_unless_no_proxy_matches_and_trusts_the_ca_bundle() {
    let tls = TestTls::generate();
    let hub = Hub::start_tls(None, &tls).await;
    let data = content(200_000, 13);
    let sha = hub.add(REPO, "w.bin", data.clone(), true);
    let proxy = ForwardProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_bundle = tls.write_ca_bundle(dir.path());
    let https_options = |no_proxy: Option<&str>, ca_bundle: Option<PathBuf>| FetchOptions {
        proxy: ProxyConfig {
            https: Some(proxy.url()),
            no_proxy: no_proxy.map(str::to_owned),
            ..Default::default()
        },
        ca_bundle,
        ..options(&hub)
    };
    assert!(hub.endpoint().starts_with("https://"));

    // Through the proxy: one tunnel per host (hub, then the CDN it redirects to), nothing
    // forwarded in clear text, and the file verified.
    let store = Store::open(dir.path().join("a")).unwrap();
    let (result, _) = run(
        &store,
        &one_file("w.bin", Some(&sha)),
        &https_options(None, Some(ca_bundle.clone())),
    )
    .await;
    assert_eq!(result.unwrap().files_downloaded, 1);
    assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
    assert_eq!(visible_files(store.root()).len(), 1);
    assert_eq!(store.manifest().unwrap().models["m"].files[0].sha256, sha);
    let tunnels = proxy.tunnels();
    assert!(tunnels.contains(&hub.hub_addr.to_string()), "{tunnels:?}");
    assert!(
        tunnels.contains(&hub.cdn_addr.to_string()),
        "the CDN redirect is tunnelled too: {tunnels:?}"
    );
    assert_eq!(
        proxy.targets(),
        tunnels,
        "nothing went through in clear text"
    );
    assert_eq!(hub.cdn_gets().len(), 1);

    // NO_PROXY naming the host: straight to the servers, the proxy sees nothing.
    let tunnels_before = proxy.tunnels().len();
    let requests_before = hub.requests();
    let store = Store::open(dir.path().join("b")).unwrap();
    let (result, _) = run(
        &store,
        &one_file("w.bin", Some(&sha)),
        &https_options(Some("example.com,127.0.0.1"), Some(ca_bundle.clone())),
    )
    .await;
    assert_eq!(result.unwrap().files_downloaded, 1);
    assert_nothing_corrupt_visible(&store, &[("m/w.bin", &data)]);
    assert_eq!(visible_files(store.root()).len(), 1);
    assert!(hub.requests() > requests_before, "the servers were asked");
    assert_eq!(
        proxy.tunnels().len(),
        tunnels_before,
        "the proxy was bypassed"
    );

    // Trusting another CA (not the system's roots: the test must not depend on the machine
    // having any): refused at once with what to do (no retries: waiting cannot fix trust).
    let other_ca_dir = tempfile::tempdir().unwrap();
    let other_ca = TestTls::generate().write_ca_bundle(other_ca_dir.path());
    let store = Store::open(dir.path().join("c")).unwrap();
    let (result, events) = run(
        &store,
        &one_file("w.bin", Some(&sha)),
        &https_options(None, Some(other_ca)),
    )
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, FetchError::UntrustedCertificate { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("SDKUBE_CA_BUNDLE"), "{err}");
    assert!(err.is_environment());
    assert!(!events
        .iter()
        .any(|e| matches!(e, ProgressEvent::Retry { .. })));
    assert!(visible_files(store.root()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_bundle_that_cannot_be_read_is_a_configuration_error_before_any_request() {
    let hub = Hub::start(None).await;
    let sha = hub.add(REPO, "w.bin", content(1000, 14), true);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s")).unwrap();
    let opts = FetchOptions {
        ca_bundle: Some(dir.path().join("no-such-ca.pem")),
        ..options(&hub)
    };
    let (result, _) = run(&store, &one_file("w.bin", Some(&sha)), &opts).await;
    let err = result.unwrap_err();
    assert!(matches!(err, FetchError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("no-such-ca.pem"), "{err}");
    assert_eq!(hub.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_url_sources_with_and_without_sha() {
    let hub = Hub::start(None).await;
    let data = content(70_000, 12);
    let sha = hub.add(REPO, "x", data.clone(), true);
    let url = format!("http://{}/blob/{sha}", hub.cdn_addr);
    let c = catalog(&format!(
        "[[model]]\nname = \"u\"\n[[model.file]]\nurl = \"{url}\"\nfile_name = \"up.pth\"\nsha256 = \"{sha}\"\n\
         [[model]]\nname = \"v\"\n[[model.file]]\nurl = \"{url}\"\nfile_name = \"up.pth\"\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let opts = FetchOptions {
        hf_token: Some("must-not-be-sent".into()),
        ..options(&hub)
    };
    run(&store, &[entry(&c, "u"), entry(&c, "v")], &opts)
        .await
        .0
        .unwrap();
    assert_nothing_corrupt_visible(&store, &[("u/up.pth", &data), ("v/up.pth", &data)]);
    assert_eq!(
        store.manifest().unwrap().models["v"].files[0].sha256,
        sha,
        "computed hash recorded"
    );
    assert_eq!(store.model_path("u"), Some(store.file_path("u", "up.pth")));
}

/// The server runs fetches with `tokio::spawn`, which needs a `Send` future; this
/// fails to compile otherwise.
#[test]
fn the_fetch_future_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let options = FetchOptions::default();
    let future = fetch(&store, &[], &options, |_| {});
    assert_send(&future);
}
