//! Loopback throughput of the fetcher against `curl -o`, on the same server in the same run.
//!
//! `cargo run --release -p sdkube-store --example fetch_bench [SIZE_MIB] [CAP_MB_PER_S]`
//! (defaults: 2048 MiB, 200 MB/s). Serves SIZE_MIB of data from memory on 127.0.0.1 (the
//! test hub's CDN), then times: curl; our single stream; our 4 ranged connections; and the
//! same three against a per-connection cap of CAP MB/s. Our times include the sha256
//! verification and the fsync before the atomic rename; curl's include neither. Downloads go
//! to /tmp and are deleted after each run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use sdkube_store::{fetch, Catalog, FetchOptions, Store};

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2048);
    let cap_mb: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let size = mib << 20;

    eprintln!("generating {mib} MiB ...");
    let hub = common::Hub::start(None).await;
    let sha = hub.add("bench/bench", "blob.bin", common::content(size, 42), true);
    let url = format!("http://{}/blob/{sha}", hub.cdn_addr);
    let catalog = Catalog::parse(
        &format!("[[model]]\nname = \"bench\"\n[[model.file]]\nurl = \"{url}\"\nsha256 = \"{sha}\"\nsize = {size}\n"),
        "bench",
    )?;
    let entry = catalog.get("bench").expect("bench entry").clone();

    println!("| case | tool | seconds | MB/s |");
    println!("|---|---|---:|---:|");
    for (label, cap) in [
        ("uncapped", None),
        ("capped per connection", Some(cap_mb * 1_000_000)),
    ] {
        hub.throttle(cap);
        let label = match cap {
            Some(_) => format!("{label} ({cap_mb} MB/s)"),
            None => label.to_owned(),
        };
        let out = std::env::temp_dir().join("sdkube-bench-curl.bin");
        let started = Instant::now();
        let status = Command::new("curl")
            .args(["-s", "-f", "-o"])
            .arg(&out)
            .arg(&url)
            .status()?;
        let curl = started.elapsed();
        anyhow::ensure!(status.success(), "curl failed: {status}");
        anyhow::ensure!(
            std::fs::metadata(&out)?.len() == size as u64,
            "curl got a short file"
        );
        std::fs::remove_file(&out)?;
        row(&label, "curl -o", curl, size);

        for connections in [1usize, 4] {
            let dir = tempfile::Builder::new()
                .prefix("sdkube-bench")
                .tempdir_in("/tmp")?;
            let store = Store::open(dir.path())?;
            let options = FetchOptions {
                connections,
                ranged_min_size: 64 << 20,
                progress_interval: Duration::from_secs(3600),
                ..FetchOptions::default()
            };
            let started = Instant::now();
            fetch(&store, std::slice::from_ref(&entry), &options, |_| {}).await?;
            let ours = started.elapsed();
            let tool = if connections == 1 {
                "sdkube, 1 stream (+sha256)".to_owned()
            } else {
                format!("sdkube, {connections} ranges (+sha256)")
            };
            row(&label, &tool, ours, size);
        }
    }
    Ok(())
}

fn row(case: &str, tool: &str, elapsed: Duration, size: usize) {
    let secs = elapsed.as_secs_f64();
    println!(
        "| {case} | {tool} | {secs:.2} | {:.0} |",
        size as f64 / 1e6 / secs
    );
}
