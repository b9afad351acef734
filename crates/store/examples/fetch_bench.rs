//! Loopback throughput of the fetcher against `curl -o`, on the same server in the same run.
//!
//! ```text
//! cargo run --release -p sdkube-store --example fetch_bench -- \
//!     [--size-mib 2048] [--cap-mb 200] [--rounds 3] [--dir /tmp] [--only curl,curl+verify,1,4]
//! ```
//!
//! Serves SIZE MiB of data from memory on 127.0.0.1 (the test hub's CDN), then, for each of
//! two cases (uncapped, and capped at CAP MB/s per connection), runs `--rounds` rounds of:
//! `curl -o`; `curl -o` followed by a sha256 of the file and an fsync (the guarantees we
//! give); our single stream; our 4 ranged connections. The order rotates from round to
//! round so that no tool always runs first (or after the same neighbour): a shared machine is
//! noisy. Between runs, untimed, `sync` waits for the writeback a run left behind, which would
//! otherwise slow the next one down. Prints each run on stderr and a markdown table of medians
//! on stdout: the range, the ratio to plain curl's median, and the median of that ratio taken
//! within each round.
//!
//! Our times include the sha256 verification, the fsync before the atomic rename and the
//! manifest update; plain curl's include neither hashing nor fsync. Downloads go to `--dir`
//! (default the system temp dir) and are deleted after each run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use sdkube_store::{fetch_blocking, Catalog, FetchOptions, ModelEntry, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Curl,
    /// curl, then what the fetcher also does: sha256 of the file and an fsync.
    CurlVerified,
    Sdkube {
        connections: usize,
    },
}

impl Tool {
    fn label(self) -> String {
        match self {
            Tool::Curl => "curl -o".into(),
            Tool::CurlVerified => "curl -o, then sha256 + fsync".into(),
            Tool::Sdkube { connections: 1 } => "sdkube, 1 stream (+sha256, fsync)".into(),
            Tool::Sdkube { connections } => {
                format!("sdkube, {connections} ranges (+sha256, fsync)")
            }
        }
    }
}

struct Args {
    size_mib: usize,
    cap_mb: u64,
    rounds: usize,
    dir: PathBuf,
    tools: Vec<Tool>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        size_mib: 2048,
        cap_mb: 200,
        rounds: 3,
        dir: std::env::temp_dir(),
        tools: vec![
            Tool::Curl,
            Tool::CurlVerified,
            Tool::Sdkube { connections: 1 },
            Tool::Sdkube { connections: 4 },
        ],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--size-mib" => args.size_mib = value()?.parse()?,
            "--cap-mb" => args.cap_mb = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--dir" => args.dir = value()?.into(),
            "--only" => {
                args.tools = value()?
                    .split(',')
                    .map(|tool| match tool {
                        "curl" => Ok(Tool::Curl),
                        "curl+verify" => Ok(Tool::CurlVerified),
                        n => Ok(Tool::Sdkube {
                            connections: n
                                .parse()
                                .context("--only takes curl, curl+verify or connection counts")?,
                        }),
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            other => bail!("unknown argument {other}; see the file's docs"),
        }
    }
    ensure!(
        args.rounds > 0 && args.size_mib > 0,
        "sizes and rounds must be > 0"
    );
    Ok(args)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let size = args.size_mib << 20;
    eprintln!("generating {} MiB ...", args.size_mib);
    let hub = common::Hub::start(None).await;
    let sha = hub.add("bench/bench", "blob.bin", common::content(size, 42), true);
    let url = format!("http://{}/blob/{sha}", hub.cdn_addr);
    let catalog = Catalog::parse(
        &format!("[[model]]\nname = \"bench\"\n[[model.file]]\nurl = \"{url}\"\nsha256 = \"{sha}\"\nsize = {size}\n"),
        "bench",
    )?;
    let entry = catalog.get("bench").context("bench entry")?.clone();

    let mut rows = Vec::new();
    for cap in [None, Some(args.cap_mb * 1_000_000)] {
        hub.throttle(cap);
        let case = match cap {
            Some(_) => format!("capped at {} MB/s per connection", args.cap_mb),
            None => "uncapped".to_owned(),
        };
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); args.tools.len()];
        for round in 0..args.rounds {
            for k in 0..args.tools.len() {
                let i = (k + round) % args.tools.len();
                let tool = args.tools[i];
                let elapsed = match tool {
                    Tool::Curl => run_curl(&url, size, &args.dir, None)?,
                    Tool::CurlVerified => run_curl(&url, size, &args.dir, Some(&sha))?,
                    Tool::Sdkube { connections } => {
                        run_sdkube(&entry, connections, &args.dir).await?
                    }
                };
                eprintln!(
                    "{case}, round {}: {}: {:.2} s, {:.0} MB/s",
                    round + 1,
                    tool.label(),
                    elapsed.as_secs_f64(),
                    mb_per_s(size, elapsed)
                );
                times[i].push(elapsed);
                settle();
            }
        }
        let curl = args.tools.iter().position(|t| *t == Tool::Curl);
        for (tool, runs) in args.tools.iter().zip(&times) {
            rows.push((
                case.clone(),
                *tool,
                runs.clone(),
                curl.map(|c| times[c].clone()),
            ));
        }
    }

    println!(
        "\n{} MiB over loopback, {} rounds. \"vs curl\": curl's median time over ours; \
         \"per round\": the median of that ratio taken within each round (less sensitive to \
         load that changes between rounds).\n",
        args.size_mib, args.rounds
    );
    println!("| case | tool | median s | median MB/s | MB/s range | vs curl | per round |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (case, tool, runs, curl_runs) in rows {
        let m = median(&runs);
        let speeds: Vec<f64> = runs.iter().map(|d| mb_per_s(size, *d)).collect();
        let (lo, hi) = speeds
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
        let (ratio, per_round) = match curl_runs {
            Some(curl) => {
                let mut ratios: Vec<f64> = curl
                    .iter()
                    .zip(&runs)
                    .map(|(c, t)| c.as_secs_f64() / t.as_secs_f64())
                    .collect();
                ratios.sort_by(f64::total_cmp);
                (
                    format!("{:.2}×", median(&curl).as_secs_f64() / m.as_secs_f64()),
                    format!("{:.2}×", ratios[ratios.len() / 2]),
                )
            }
            None => ("—".into(), "—".into()),
        };
        println!(
            "| {case} | {} | {:.2} | {:.0} | {lo:.0}–{hi:.0} | {ratio} | {per_round} |",
            tool.label(),
            m.as_secs_f64(),
            mb_per_s(size, m),
        );
    }
    Ok(())
}

/// `curl -o`; with `verify`, then also the file's sha256 (the same sha2 code and 1 MiB reads
/// as the store's verification) checked against it, and an fsync: the guarantees the fetcher
/// gives, had they been added after curl.
fn run_curl(
    url: &str,
    size: usize,
    dir: &std::path::Path,
    verify: Option<&str>,
) -> anyhow::Result<Duration> {
    let out = dir.join("sdkube-bench-curl.bin");
    let started = Instant::now();
    let status = Command::new("curl")
        .args(["-s", "-f", "-o"])
        .arg(&out)
        .arg(url)
        .status()
        .context("cannot run curl")?;
    ensure!(status.success(), "curl failed: {status}");
    if let Some(expected) = verify {
        ensure!(
            sdkube_store::sha256_file(&out)? == expected,
            "curl's file is corrupt"
        );
        std::fs::File::open(&out)?.sync_data()?;
    }
    let elapsed = started.elapsed();
    ensure!(
        std::fs::metadata(&out)?.len() == size as u64,
        "curl got a short file"
    );
    std::fs::remove_file(&out)?;
    Ok(elapsed)
}

async fn run_sdkube(
    entry: &ModelEntry,
    connections: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Duration> {
    let store_dir = tempfile::Builder::new()
        .prefix("sdkube-bench")
        .tempdir_in(dir)?;
    let store = Store::open(store_dir.path())?;
    let options = FetchOptions {
        connections,
        ranged_min_size: 64 << 20,
        progress_interval: Duration::from_millis(500),
        ..FetchOptions::default()
    };
    let entry = entry.clone();
    // As the CLI runs it: `fetch_blocking` on its own runtime, apart from the server's.
    let (report, elapsed) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let report = fetch_blocking(&store, std::slice::from_ref(&entry), &options, |_| {});
        (report, started.elapsed())
    })
    .await?;
    let report = report?;
    ensure!(report.files_downloaded == 1, "nothing was downloaded");
    Ok(elapsed)
}

/// Waits, untimed, for the disk writes a run left behind (curl's file is deleted with its
/// pages dirty, but writeback may have started), so that no run pays for the one before.
fn settle() {
    let _ = Command::new("sync").status();
}

fn median(runs: &[Duration]) -> Duration {
    let mut sorted = runs.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn mb_per_s(size: usize, elapsed: Duration) -> f64 {
    size as f64 / 1e6 / elapsed.as_secs_f64()
}
