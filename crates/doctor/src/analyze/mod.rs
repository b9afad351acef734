//! The diagnosis proper: a pure function from a [`Snapshot`] to [`Finding`]s.
//!
//! Each submodule looks at one part of what can keep sdkube from running, in the order a
//! pod meets them: storage (PVCs), scheduling (GPU, selectors, taints), image pulls, the
//! `fetch-models` init container, the main container, and the nodes themselves.

mod containers;
mod images;
mod nodes;
mod quantity;
mod scale_out;
mod scheduling;
mod storage;

pub use containers::{classify_fetch_log, FetchFailure, FetchFailureKind};
pub use quantity::parse_quantity;
pub use scale_out::{classify_queue_log, QueueFailure, QueueFailureKind};

use k8s_openapi::api::core::v1::{Event, Pod};

use crate::finding::{Evidence, Finding, FindingCode, Fix, Severity};
use crate::snapshot::{Component, Snapshot, INSTANCE_LABEL};

/// The extended resource the NVIDIA device plugin advertises.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Everything wrong with the deployment described by `snapshot`, most severe first.
/// An empty result means healthy.
pub fn analyze(snapshot: &Snapshot) -> Vec<Finding> {
    let mut findings = Vec::new();
    if snapshot.app_pods().next().is_none() {
        findings.push(no_pods(snapshot));
    }
    storage::check(snapshot, &mut findings);
    scheduling::check(snapshot, &mut findings);
    images::check(snapshot, &mut findings);
    containers::check(snapshot, &mut findings);
    scale_out::check(snapshot, &mut findings);
    nodes::check(snapshot, &mut findings);
    for gap in &snapshot.not_read {
        findings.push(Finding::new(
            FindingCode::NotChecked,
            Severity::Info,
            format!("Could not read {}", gap.what),
            Fix::advice(gap.reason.clone()),
        ));
    }
    // Stable: most severe first, otherwise in the order a pod meets the problems.
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    findings
}

fn no_pods(snapshot: &Snapshot) -> Finding {
    let ns = &snapshot.namespace;
    let selector = snapshot.label_selector();
    Finding::new(
        FindingCode::NoPods,
        Severity::Warning,
        format!("No sdkube pods in namespace {ns} (selector {selector})"),
        Fix::advice("Check that the release is installed in this namespace, or name it with --release / --namespace.")
            .command(format!("helm list -n {ns}"))
            .command(format!("kubectl get pods -n {ns} -l {selector}")),
    )
}

/// A values snippet written for the top level (`resources:`, `nodeSelector:`…), moved under
/// the values of the pod's component: `api.` for the api, `queue.redis.bundled.` for Redis.
pub(crate) fn values_for(pod: Option<&Pod>, yaml: &str) -> String {
    let component = pod.map_or(Component::Server, Component::of_pod);
    nest(component.values_path(), yaml)
}

/// `yaml` nested under the keys of `path`.
pub(crate) fn nest(path: &[&str], yaml: &str) -> String {
    let mut out = String::new();
    for (depth, key) in path.iter().enumerate() {
        out.push_str(&format!("{}{key}:\n", "  ".repeat(depth)));
    }
    let indent = "  ".repeat(path.len());
    for line in yaml.lines() {
        out.push_str(&indent);
        out.push_str(line);
        out.push('\n');
    }
    out.trim_end().to_owned()
}

/// `Pod ns/name`, the way findings name a pod.
pub(crate) fn pod_ref(pod: &Pod) -> String {
    format!(
        "Pod {}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        name(pod)
    )
}

pub(crate) fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

/// The release a pod belongs to, for `helm upgrade` commands.
pub(crate) fn release_of(snapshot: &Snapshot, pod: Option<&Pod>) -> String {
    snapshot
        .release
        .clone()
        .or_else(|| {
            pod.and_then(|p| p.metadata.labels.as_ref())
                .and_then(|l| l.get(INSTANCE_LABEL).cloned())
        })
        .unwrap_or_else(|| "<release>".to_owned())
}

/// `helm upgrade` with a values file, the usual last step of a values fix.
pub(crate) fn helm_upgrade(snapshot: &Snapshot, pod: Option<&Pod>) -> String {
    format!(
        "helm upgrade {} <chart> -n {} --reuse-values -f values-fix.yaml",
        release_of(snapshot, pod),
        snapshot.namespace
    )
}

pub(crate) fn event_evidence(object: &str, event: &Event) -> Evidence {
    let count = event
        .series
        .as_ref()
        .and_then(|s| s.count)
        .or(event.count)
        .filter(|c| *c > 1);
    let message = event.message.clone().unwrap_or_default();
    let message = match count {
        Some(c) => format!("{message} (x{c})"),
        None => message,
    };
    Evidence::new(object, event.reason.as_deref(), message)
}

/// Whether a pod still holds node resources (scheduled and not finished).
pub(crate) fn holds_resources(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some()
        && !matches!(phase, Some("Succeeded") | Some("Failed"))
}

/// How many units of `resource` a pod asks for: the larger of its biggest init container
/// and the sum of its containers, as the scheduler counts (limits stand in for requests).
pub(crate) fn pod_request(pod: &Pod, resource: &str) -> f64 {
    let Some(spec) = pod.spec.as_ref() else {
        return 0.0;
    };
    let container_request = |c: &k8s_openapi::api::core::v1::Container| {
        c.resources
            .as_ref()
            .and_then(|r| {
                r.requests
                    .as_ref()
                    .and_then(|m| m.get(resource))
                    .or_else(|| r.limits.as_ref().and_then(|m| m.get(resource)))
            })
            .and_then(|q| parse_quantity(&q.0))
            .unwrap_or(0.0)
    };
    let sum: f64 = spec.containers.iter().map(container_request).sum();
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(container_request)
        .fold(0.0, f64::max);
    sum.max(init)
}

/// Bytes as people read them (`7.5 GiB`).
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
