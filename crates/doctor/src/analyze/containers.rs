//! Containers that start but fail: the `fetch-models` init container (classified from its
//! last log lines), crash loops, OOM kills, failing readiness, evictions.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use serde::Serialize;

use super::{event_evidence, helm_upgrade, name, pod_ref, values_for};
use crate::finding::{Evidence, Finding, FindingCode, Fix, Severity};
use crate::snapshot::{Component, Snapshot, INIT_CONTAINER, MAIN_CONTAINER};

/// How many log lines a finding quotes.
const QUOTED_LINES: usize = 5;

/// Why `sdkube fetch` failed, read from its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FetchFailureKind {
    /// The hub (or proxy) could not be reached.
    Network,
    /// The store's volume is full.
    DiskFull,
    /// A downloaded file's checksum did not match.
    Checksum,
    /// The hub refused (401/403): a token is missing or lacks access.
    Unauthorized,
    /// A model name the catalog does not have.
    UnknownModel,
    /// A flag or `SDKUBE_*` variable with a value sdkube refuses.
    BadSetting,
    /// The store's volume refuses writes (owner, mode, or mounted read-only).
    StoreNotWritable,
    /// Anything else.
    Other,
}

/// The classified failure and the line that shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchFailure {
    /// What went wrong.
    pub kind: FetchFailureKind,
    /// The log line that shows it.
    pub line: String,
}

/// The message a log line carries: the `message` of a `--progress json` error object, or
/// the line itself.
fn line_message(line: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(line.trim()) {
        Ok(serde_json::Value::Object(map)) => {
            let is_error = map.get("event").and_then(|e| e.as_str()) == Some("error")
                || map.get("level").and_then(|e| e.as_str()) == Some("ERROR");
            if !is_error {
                return None;
            }
            map.get("message")
                .or_else(|| map.get("error"))
                .or_else(|| map.get("fields").and_then(|f| f.get("message")))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        }
        _ => Some(line.trim().to_owned()).filter(|l| !l.is_empty()),
    }
}

fn kind_of(message: &str) -> Option<FetchFailureKind> {
    let lower = message.to_lowercase();
    let has = |signs: &[&str]| signs.iter().any(|s| lower.contains(s));
    if has(&["unknown model"]) {
        Some(FetchFailureKind::UnknownModel)
    } else if has(&[
        "permission denied",
        "os error 13",
        "read-only file system",
        "os error 30",
    ]) {
        Some(FetchFailureKind::StoreNotWritable)
    } else if has(&[
        "invalid value '",
        "environment variable sdkube_",
        "unexpected argument",
        "unknown --",
    ]) {
        Some(FetchFailureKind::BadSetting)
    } else if has(&[
        "no space left on device",
        "os error 28",
        "disk full",
        "not enough space",
    ]) {
        Some(FetchFailureKind::DiskFull)
    } else if has(&[
        "checksum mismatch",
        "sha256 mismatch",
        "digest mismatch",
        "hash mismatch",
    ]) {
        Some(FetchFailureKind::Checksum)
    } else if has(&[
        "401",
        "unauthorized",
        "403 forbidden",
        "gated repo",
        "invalid token",
        "access to model",
    ]) {
        Some(FetchFailureKind::Unauthorized)
    } else if has(&[
        "network is unreachable",
        "connection refused",
        "connection timed out",
        "timed out",
        "dns error",
        "failed to lookup address",
        "name or service not known",
        "temporary failure in name resolution",
        "no route to host",
        "connection reset",
        "tls handshake",
        "os error 101",
        "os error 110",
        "os error 111",
        "os error 113",
    ]) {
        Some(FetchFailureKind::Network)
    } else if has(&["error", "failed", "panicked"]) {
        Some(FetchFailureKind::Other)
    } else {
        None
    }
}

/// Reads the tail of `sdkube fetch` output (JSON lines or plain text) and says why it
/// failed: the last line that shows a known cause wins over generic errors.
pub fn classify_fetch_log(lines: &[String]) -> Option<FetchFailure> {
    let mut generic = None;
    for line in lines.iter().rev() {
        let Some(message) = line_message(line) else {
            continue;
        };
        match kind_of(&message) {
            Some(FetchFailureKind::Other) if generic.is_none() => {
                generic = Some(FetchFailure {
                    kind: FetchFailureKind::Other,
                    line: message,
                });
            }
            Some(FetchFailureKind::Other) => {}
            Some(kind) => {
                return Some(FetchFailure {
                    kind,
                    line: message,
                })
            }
            None => {}
        }
    }
    generic
}

pub(super) fn check(snapshot: &Snapshot, findings: &mut Vec<Finding>) {
    for pod in snapshot.app_pods() {
        let status = pod.status.as_ref();
        if status.and_then(|s| s.reason.as_deref()) == Some("Evicted") {
            findings.push(evicted(snapshot, pod));
            continue;
        }
        if let Some(f) = config_error(snapshot, pod) {
            findings.push(f);
            continue;
        }
        let inits = status
            .and_then(|s| s.init_container_statuses.as_ref())
            .into_iter()
            .flatten();
        for init in inits {
            if init_failing(init) {
                findings.push(init_failure(snapshot, pod, init));
            }
        }
        let mains = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten();
        for container in mains {
            main_container(snapshot, pod, container, findings);
        }
    }
}

fn exit_code(status: &ContainerStatus) -> Option<i32> {
    status
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| {
            status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
        })
        .map(|t| t.exit_code)
}

fn waiting_reason(status: &ContainerStatus) -> Option<&str> {
    status
        .state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.reason.as_deref())
}

fn init_failing(status: &ContainerStatus) -> bool {
    let done_ok = status
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .is_some_and(|t| t.exit_code == 0);
    if done_ok {
        return false;
    }
    waiting_reason(status) == Some("CrashLoopBackOff")
        || status.restart_count > 0
        || exit_code(status).is_some_and(|c| c != 0)
}

fn state_evidence(pod: &Pod, status: &ContainerStatus) -> Evidence {
    let reason = waiting_reason(status)
        .or_else(|| {
            status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.reason.as_deref())
        })
        .unwrap_or("Error");
    let exit = exit_code(status)
        .map(|c| format!(", last exit code {c}"))
        .unwrap_or_default();
    Evidence::new(
        format!("{} container {}", pod_ref(pod), status.name),
        Some(reason),
        format!("restarted {} times{exit}", status.restart_count),
    )
}

fn log_evidence(snapshot: &Snapshot, pod: &Pod, container: &str) -> Vec<Evidence> {
    let Some(log) = snapshot.log(name(pod), container) else {
        return Vec::new();
    };
    let start = log.lines.len().saturating_sub(QUOTED_LINES);
    log.lines[start..]
        .iter()
        .map(|line| {
            Evidence::new(
                format!("{} container {container} log", pod_ref(pod)),
                None,
                line.clone(),
            )
        })
        .collect()
}

fn init_failure(snapshot: &Snapshot, pod: &Pod, status: &ContainerStatus) -> Finding {
    let lines = snapshot
        .log(name(pod), &status.name)
        .map(|l| l.lines.clone())
        .unwrap_or_default();
    let failure = classify_fetch_log(&lines);
    let who = if status.name == INIT_CONTAINER {
        "Model download (init container fetch-models)".to_owned()
    } else {
        format!("Init container {}", status.name)
    };
    let upgrade = helm_upgrade(snapshot, Some(pod));
    let (code, title, fix) = match failure.as_ref().map(|f| f.kind) {
        Some(FetchFailureKind::Network) => (
            FindingCode::InitNetwork,
            format!("{who} cannot reach the model hub"),
            Fix::advice("The pod has no route to the hub: give it a proxy, or point it at a mirror.")
                .values("proxy:\n  http: http://<proxy>:3128\n  https: http://<proxy>:3128\n  noProxy: localhost,127.0.0.1,.svc,.cluster.local\n# or a mirror:\nhfEndpoint: https://<mirror>")
                .command(upgrade),
        ),
        Some(FetchFailureKind::DiskFull) => (
            FindingCode::InitDiskFull,
            format!("{who} ran out of disk space in the model store"),
            Fix::advice("Give the model store a bigger volume (a new claim: the old one cannot always grow), or free the node's disk for a local volume.")
                .values("persistence:\n  size: 60Gi")
                .command(format!("kubectl exec -n {} {} -c {} -- df -h /models   # when it runs", snapshot.namespace, name(pod), status.name))
                .command(upgrade),
        ),
        Some(FetchFailureKind::Checksum) => (
            FindingCode::InitChecksum,
            format!("{who} got a file whose checksum does not match"),
            Fix::advice("The download was corrupted (or the mirror serves a different revision). The partial file is discarded; restart the pod to retry, and check hfEndpoint if it repeats.")
                .command(format!("kubectl delete pod -n {} {}", snapshot.namespace, name(pod)))
                .values("hfEndpoint: https://huggingface.co"),
        ),
        Some(FetchFailureKind::Unauthorized) => (
            FindingCode::InitUnauthorized,
            format!("{who} is refused by the hub (401/403): a token is missing or lacks access"),
            Fix::advice("Accept the model's licence on the hub with your account, then give the chart a token (a Secret is better than a value).")
                .command(format!("kubectl create secret generic hf-token -n {} --from-literal=HF_TOKEN=<token>", snapshot.namespace))
                .values("existingSecret: hf-token\n# or: hfToken: <token>")
                .command(upgrade),
        ),
        Some(FetchFailureKind::UnknownModel) => (
            FindingCode::InitUnknownModel,
            format!("{who} is asked for a model the catalog does not have"),
            Fix::advice("The chart's `models` list names a model sdkube does not know: use a name `sdkube models list` shows (a model of your own needs a catalog file, `fetch.extraArgs: [--catalog, FILE]`).")
                .values("models:\n  - sd-1.5")
                .command(upgrade),
        ),
        Some(FetchFailureKind::BadSetting) => (
            FindingCode::InitBadSetting,
            format!("{who} refuses a setting"),
            Fix::advice("A value the chart passes (an SDKUBE_* variable, or fetch.extraArgs) is not one sdkube accepts; the line below names it and what it allows. Correct it in the values.")
                .command(upgrade),
        ),
        Some(FetchFailureKind::StoreNotWritable) => {
            let (advice, command) = not_writable_fix(snapshot, pod, &status.name);
            (
                FindingCode::InitStoreNotWritable,
                format!("{who} cannot write to the model store volume"),
                Fix::advice(advice).command(command),
            )
        }
        Some(FetchFailureKind::Other) | None => (
            FindingCode::InitFailing,
            format!("{who} keeps failing"),
            Fix::advice("Read its last lines below.")
                .command(format!("kubectl logs -n {} {} -c {} --tail=50", snapshot.namespace, name(pod), status.name)),
        ),
    };
    let mut finding =
        Finding::new(code, Severity::Error, title, fix).with_evidence(state_evidence(pod, status));
    if let Some(failure) = &failure {
        finding.evidence.push(Evidence::new(
            format!("{} container {} log", pod_ref(pod), status.name),
            Some("classified"),
            failure.line.clone(),
        ));
    }
    finding
        .evidence
        .extend(log_evidence(snapshot, pod, &status.name));
    finding
}

/// Who the container runs as and where its volume lives on the node, for the chown that
/// fixes an unwritable store: the kubelet applies `fsGroup` to most volume types, but never
/// to hostPath, and a directory made by hand on the node belongs to root.
fn not_writable_fix(snapshot: &Snapshot, pod: &Pod, container: &str) -> (String, String) {
    let spec = pod.spec.as_ref();
    let uid = spec
        .and_then(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
                .find(|c| c.name == container)
        })
        .and_then(|c| c.security_context.as_ref())
        .and_then(|c| c.run_as_user)
        .or_else(|| {
            spec.and_then(|s| s.security_context.as_ref())
                .and_then(|c| c.run_as_user)
        });
    let owner = uid.map_or("<uid>:<gid>".to_owned(), |u| format!("{u}:{u}"));
    let claims: Vec<&str> = spec
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
        .collect();
    let pv = snapshot
        .pvcs
        .iter()
        .filter(|c| claims.contains(&c.metadata.name.as_deref().unwrap_or_default()))
        .find_map(|c| c.spec.as_ref()?.volume_name.as_deref())
        .and_then(|name| {
            snapshot
                .pvs
                .iter()
                .find(|pv| pv.metadata.name.as_deref() == Some(name))
        })
        .and_then(|pv| pv.spec.as_ref());
    let host_path = pv
        .and_then(|s| s.host_path.as_ref())
        .map(|h| h.path.clone());
    let path = host_path
        .clone()
        .or_else(|| pv.and_then(|s| s.local.as_ref()).map(|l| l.path.clone()));
    let node = spec.and_then(|s| s.node_name.clone()).or_else(|| {
        pv.and_then(|s| s.node_affinity.as_ref())
            .and_then(|a| a.required.as_ref())
            .and_then(|r| r.node_selector_terms.first())
            .and_then(|t| t.match_expressions.as_ref())
            .and_then(|e| e.first())
            .and_then(|e| e.values.as_ref())
            .and_then(|v| v.first().cloned())
    });
    let user = uid.map_or("the pod's user".to_owned(), |u| format!("uid {u}"));
    let advice = match &host_path {
        Some(_) => format!("The volume is a hostPath directory on the node, which keeps the owner it has (the kubelet creates it as root and never applies fsGroup to hostPath): give it to {user}, or use a `local` volume, which fsGroup covers."),
        None => format!("The volume does not let {user} write (its owner or mode, or it is mounted read-only): give the directory to that user, or let the pod's fsGroup own it."),
    };
    let command = match (path, node) {
        (Some(path), Some(node)) => format!("sudo chown -R {owner} {path}   # on node {node}"),
        (Some(path), None) => format!("sudo chown -R {owner} {path}   # on the volume's node"),
        _ => format!(
            "kubectl logs -n {} {} -c {container} --tail=20",
            snapshot.namespace,
            name(pod)
        ),
    };
    (advice, command)
}

/// A container the kubelet cannot even create because a Secret, a key of it, or a ConfigMap
/// it reads is missing (`CreateContainerConfigError`): a typo in `existingSecret`,
/// `queue.redis.existingSecret` or its key.
fn config_error(snapshot: &Snapshot, pod: &Pod) -> Option<Finding> {
    let status = pod.status.as_ref()?;
    let (container, message) = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            (w.reason.as_deref() == Some("CreateContainerConfigError"))
                .then(|| (c.name.clone(), w.message.clone().unwrap_or_default()))
        })?;
    let ns = &snapshot.namespace;
    let secret = message
        .split('"')
        .nth(1)
        .filter(|_| message.starts_with("secret "))
        .map(str::to_owned)
        .or_else(|| {
            message
                .split(" in Secret ")
                .nth(1)
                .map(|s| s.rsplit('/').next().unwrap_or(s).trim().to_owned())
        });
    let fix = match &secret {
        Some(secret) => Fix::advice(format!(
            "The pod reads Secret {secret}, which is missing or lacks the key named below. Create it (or correct the name or key in the values: existingSecret, queue.redis.existingSecret and queue.redis.existingSecretKey)."
        ))
        .command(format!("kubectl describe secret -n {ns} {secret}   # the keys it has"))
        .command(format!("kubectl create secret generic -n {ns} {secret} --from-literal=<key>=<value>")),
        None => Fix::advice("A Secret or ConfigMap the pod reads is missing: create it, or correct its name in the values.")
            .command(format!("kubectl describe pod -n {ns} {}", name(pod))),
    };
    Some(
        Finding::new(
            FindingCode::ContainerConfigError,
            Severity::Error,
            format!(
                "Container {container} of pod {} cannot be created: {message}",
                name(pod)
            ),
            fix,
        )
        .with_evidence(Evidence::new(
            format!("{} container {container}", pod_ref(pod)),
            Some("CreateContainerConfigError"),
            message,
        )),
    )
}

fn main_container(
    snapshot: &Snapshot,
    pod: &Pod,
    status: &ContainerStatus,
    findings: &mut Vec<Finding>,
) {
    // An api or worker that cannot use the queue: one finding for all of them (scale_out).
    if super::scale_out::queue_failure(snapshot, pod).is_some() {
        return;
    }
    let oom = [status.state.as_ref(), status.last_state.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref())
        .any(|t| t.reason.as_deref() == Some("OOMKilled"));
    let limit = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == status.name))
        .and_then(|c| c.resources.as_ref())
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .map(|q| q.0.clone());
    if oom {
        let limit_text = limit
            .as_deref()
            .map(|l| format!(" (limit {l})"))
            .unwrap_or_default();
        let fix = match Component::of_pod(pod) {
            Component::Redis => Fix::advice("Redis keeps the queue, results and the gallery in memory: raise its limit and keep maxmemory well below it (rewriting the append-only file forks), or keep fewer images (queue.galleryKeep, queue.resultTTL).")
                .values("queue:\n  redis:\n    bundled:\n      maxmemory: 2gb\n      resources:\n        limits:\n          memory: 4Gi\n  galleryKeep: 200"),
            Component::Api => Fix::advice("The api holds requests and images in transit (large img2img uploads, batches of results): raise its memory limit.")
                .values(values_for(Some(pod), "resources:\n  limits:\n    memory: 2Gi")),
            Component::Server | Component::Worker => Fix::advice("Raise the memory limit (SDXL needs far more host memory than SD 1.5 while loading), or use a smaller model.")
                .values("resources:\n  limits:\n    memory: 24Gi\n  requests:\n    memory: 16Gi"),
        };
        let mut finding = Finding::new(
            FindingCode::OomKilled,
            Severity::Error,
            format!(
                "Container {} of pod {} was killed for using too much memory{limit_text}",
                status.name,
                name(pod)
            ),
            fix.command(helm_upgrade(snapshot, Some(pod))),
        )
        .with_evidence(state_evidence(pod, status));
        finding
            .evidence
            .extend(log_evidence(snapshot, pod, &status.name));
        findings.push(finding);
        return;
    }
    if waiting_reason(status) == Some("CrashLoopBackOff") {
        let mut finding = Finding::new(
            FindingCode::CrashLoop,
            Severity::Error,
            format!(
                "Container {} of pod {} crashes on start (CrashLoopBackOff)",
                status.name,
                name(pod)
            ),
            Fix::advice("Its last lines below say why; the previous run's full log:").command(
                format!(
                    "kubectl logs -n {} {} -c {} --previous --tail=100",
                    snapshot.namespace,
                    name(pod),
                    status.name
                ),
            ),
        )
        .with_evidence(state_evidence(pod, status));
        finding
            .evidence
            .extend(log_evidence(snapshot, pod, &status.name));
        findings.push(finding);
        return;
    }
    let running = status
        .state
        .as_ref()
        .and_then(|s| s.running.as_ref())
        .is_some();
    if running && !status.ready {
        let probe_events: Vec<_> = snapshot
            .events_for("Pod", name(pod))
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some("Unhealthy")
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with("Readiness probe failed"))
            })
            .collect();
        let Some(last) = probe_events.last() else {
            return;
        };
        let message = last.message.as_deref().unwrap_or_default();
        let advice = if message.contains("connection refused") {
            "Nothing listens on the probed port yet: the server has not started (still loading, or listening on another port than 7860). Read its log."
        } else if message.contains("503") {
            "The server runs but /readyz says it is not ready (models still loading, or no model/GPU usable). Read its log; raise the probe's patience if loading is just slow."
        } else {
            "The readiness probe fails; read the server's log."
        };
        let container = if status.name.is_empty() {
            MAIN_CONTAINER
        } else {
            &status.name
        };
        let mut finding = Finding::new(
            FindingCode::ReadinessFailing,
            Severity::Warning,
            format!(
                "Container {container} of pod {} runs but is not ready",
                name(pod)
            ),
            Fix::advice(advice)
                .command(format!(
                    "kubectl logs -n {} {} -c {container} --tail=100",
                    snapshot.namespace,
                    name(pod)
                ))
                .command(format!(
                    "kubectl port-forward -n {} pod/{} 7860:7860 & curl -s localhost:7860/readyz",
                    snapshot.namespace,
                    name(pod)
                )),
        )
        .with_evidence(event_evidence(&pod_ref(pod), last));
        finding
            .evidence
            .extend(log_evidence(snapshot, pod, container));
        findings.push(finding);
    }
}

fn evicted(snapshot: &Snapshot, pod: &Pod) -> Finding {
    let status = pod.status.as_ref();
    let message = status.and_then(|s| s.message.clone()).unwrap_or_default();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("<node>");
    let resource = ["ephemeral-storage", "memory", "pids"]
        .into_iter()
        .find(|r| message.contains(&format!("low on resource: {r}")));
    let fix = match resource {
        Some("memory") => Fix::advice(format!("Node {node} ran short of memory: give the pod a memory request that reserves what it uses, or move other workloads away."))
            .values(values_for(Some(pod), "resources:\n  requests:\n    memory: 16Gi")),
        _ => Fix::advice(format!("Node {node} ran short of disk: free its disk (unused images, logs), and keep models on the PersistentVolume rather than in the container's filesystem."))
            .command(format!("sudo crictl rmi --prune   # on node {node}")),
    };
    Finding::new(
        FindingCode::PodEvicted,
        Severity::Warning,
        format!("Pod {} was evicted from node {node}", name(pod)),
        fix.command(format!(
            "kubectl delete pod -n {} {}   # remove the evicted pod",
            snapshot.namespace,
            name(pod)
        )),
    )
    .with_evidence(Evidence::new(pod_ref(pod), Some("Evicted"), message))
}
