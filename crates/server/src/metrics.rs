//! Prometheus metrics in the text exposition format: counters and histograms kept here,
//! gauges (queue depth, jobs by state, model readiness, memory) read at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in microseconds.
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const STEP_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const JOB_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

pub struct Metrics {
    pub step_seconds: Histogram,
    pub job_seconds: Histogram,
    pub images_generated: AtomicU64,
    /// Finished jobs by (kind, outcome).
    jobs_finished: Mutex<BTreeMap<(String, String), u64>>,
    /// Errors by where they happened (`job`, `http_4xx`, `http_5xx`, `model_load`).
    errors: Mutex<BTreeMap<String, u64>>,
}

/// Numbers read at scrape time.
pub struct Gauges {
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub jobs_by_state: Vec<(&'static str, usize)>,
    pub model_ready: bool,
    /// Live workers reporting to a shared queue (the `api` role only).
    pub workers: Option<usize>,
    /// (device label, bytes in use) where the backend tells.
    pub device_memory: Vec<(String, u64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            step_seconds: Histogram::new(STEP_BUCKETS),
            job_seconds: Histogram::new(JOB_BUCKETS),
            images_generated: AtomicU64::new(0),
            jobs_finished: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    pub fn job_finished(&self, kind: &str, outcome: &str) {
        *crate::lock(&self.jobs_finished)
            .entry((kind.to_string(), outcome.to_string()))
            .or_default() += 1;
    }

    pub fn error(&self, what: &str) {
        *crate::lock(&self.errors)
            .entry(what.to_string())
            .or_default() += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "# HELP sdkube_queue_depth Jobs waiting in the queue (the whole cluster's, with a shared queue).\n# TYPE sdkube_queue_depth gauge\nsdkube_queue_depth {}",
            g.queue_depth
        );
        let _ = writeln!(
            w,
            "# HELP sdkube_queue_capacity Most jobs the queue holds before refusing with 429.\n# TYPE sdkube_queue_capacity gauge\nsdkube_queue_capacity {}",
            g.queue_capacity
        );
        let _ = writeln!(
            w,
            "# HELP sdkube_jobs Jobs known to the server by state.\n# TYPE sdkube_jobs gauge"
        );
        for (state, n) in &g.jobs_by_state {
            let _ = writeln!(w, "sdkube_jobs{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            w,
            "# HELP sdkube_jobs_finished_total Jobs finished, by kind and outcome.\n# TYPE sdkube_jobs_finished_total counter"
        );
        for ((kind, outcome), n) in crate::lock(&self.jobs_finished).iter() {
            let _ = writeln!(
                w,
                "sdkube_jobs_finished_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            w,
            "# HELP sdkube_images_generated_total Images produced.\n# TYPE sdkube_images_generated_total counter\nsdkube_images_generated_total {}",
            self.images_generated.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            w,
            "# HELP sdkube_errors_total Errors, by where they happened.\n# TYPE sdkube_errors_total counter"
        );
        for (what, n) in crate::lock(&self.errors).iter() {
            let _ = writeln!(w, "sdkube_errors_total{{where=\"{what}\"}} {n}");
        }
        self.step_seconds.render(
            w,
            "sdkube_step_seconds",
            "Time of one sampling step (one UNet batch with CFG).",
        );
        self.job_seconds.render(
            w,
            "sdkube_job_seconds",
            "Time from a job's start to its end on a worker.",
        );
        let _ = writeln!(
            w,
            "# HELP sdkube_model_ready 1 when the model is loaded on every worker.\n# TYPE sdkube_model_ready gauge\nsdkube_model_ready {}",
            u8::from(g.model_ready)
        );
        if let Some(n) = g.workers {
            let _ = writeln!(
                w,
                "# HELP sdkube_workers Workers reporting to the shared queue.\n# TYPE sdkube_workers gauge\nsdkube_workers {n}"
            );
        }
        if !g.device_memory.is_empty() {
            let _ = writeln!(
                w,
                "# HELP sdkube_device_memory_used_bytes Memory in use on each device.\n# TYPE sdkube_device_memory_used_bytes gauge"
            );
            for (dev, bytes) in &g.device_memory {
                let _ = writeln!(
                    w,
                    "sdkube_device_memory_used_bytes{{device=\"{dev}\"}} {bytes}"
                );
            }
        }
        if let Some(rss) = resident_memory_bytes() {
            let _ = writeln!(
                w,
                "# HELP process_resident_memory_bytes Resident memory of the server.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
            );
        }
        out
    }
}

/// CUDA memory in use per device, where `nvidia-smi` tells (none on CPU).
pub fn cuda_memory_used(devices: &[String]) -> Vec<(String, u64)> {
    if !devices.iter().any(|d| d.starts_with("cuda")) {
        return Vec::new();
    }
    let Ok(out) = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (i, mib) = l.split_once(',')?;
            Some((
                format!("cuda:{}", i.trim()),
                mib.trim().parse::<u64>().ok()? * 1024 * 1024,
            ))
        })
        .collect()
}

/// Resident set size from /proc (Linux); None elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
