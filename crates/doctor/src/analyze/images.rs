//! Image pulls that fail: network (proxy/mirror), missing image, credentials, full disk.

use k8s_openapi::api::core::v1::{ContainerStatus, Node, Pod};

use super::{event_evidence, helm_upgrade, human_bytes, name, pod_ref};
use crate::finding::{Evidence, Finding, FindingCode, Fix, Severity};
use crate::snapshot::Snapshot;

const NETWORK_SIGNS: [&str; 9] = [
    "i/o timeout",
    "TLS handshake timeout",
    "connection refused",
    "no such host",
    "network is unreachable",
    "connection reset by peer",
    "context deadline exceeded",
    "DeadlineExceeded",
    "Client.Timeout exceeded",
];

pub(super) fn check(snapshot: &Snapshot, findings: &mut Vec<Finding>) {
    for pod in snapshot.app_pods() {
        let object = pod_ref(pod);
        let events = snapshot.events_for("Pod", name(pod));
        let pull_failure = events.iter().rev().find(|e| {
            e.reason.as_deref() == Some("Failed")
                && e.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("Failed to pull image"))
        });
        let waiting_on_pull = statuses(pod).find(|s| {
            s.state
                .as_ref()
                .and_then(|st| st.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                .is_some_and(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
        });
        if let Some(event) = pull_failure.filter(|_| waiting_on_pull.is_some()) {
            let message = event.message.as_deref().unwrap_or_default();
            let evidence = event_evidence(&object, event);
            findings.push(classify_pull(snapshot, pod, message, evidence));
        } else if let Some(status) = waiting_on_pull {
            let waiting = status.state.as_ref().and_then(|s| s.waiting.as_ref());
            findings.push(
                Finding::new(
                    FindingCode::ImagePullFailed,
                    Severity::Error,
                    format!("Pod {} cannot pull image {}", name(pod), status.image),
                    Fix::advice(
                        "Check that the node can reach the registry and that the image exists.",
                    )
                    .command(format!(
                        "kubectl describe pod -n {} {}",
                        snapshot.namespace,
                        name(pod)
                    )),
                )
                .with_evidence(Evidence::new(
                    format!("{object} container {}", status.name),
                    waiting.and_then(|w| w.reason.as_deref()),
                    waiting.and_then(|w| w.message.clone()).unwrap_or_default(),
                )),
            );
        }
        if !findings
            .iter()
            .any(|f| f.code == FindingCode::ImageLargerThanFreeSpace && f.title.contains(name(pod)))
        {
            if let Some(finding) = image_too_large(snapshot, pod) {
                findings.push(finding);
            }
        }
    }
}

fn statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(
            status
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
}

fn registry_of(message: &str) -> String {
    // `… failed to do request: Head "https://registry-1.docker.io/v2/…"` names the host.
    message
        .split("https://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("<registry>")
        .to_owned()
}

fn classify_pull(snapshot: &Snapshot, pod: &Pod, message: &str, evidence: Evidence) -> Finding {
    let image = message.split('"').nth(1).unwrap_or("<image>").to_owned();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("<node>");
    if message.contains("no space left on device") {
        return Finding::new(
            FindingCode::ImageLargerThanFreeSpace,
            Severity::Error,
            format!(
                "Pod {}: image {image} does not fit on node {node}'s image filesystem",
                name(pod)
            ),
            disk_fix(node),
        )
        .with_evidence(evidence);
    }
    if NETWORK_SIGNS.iter().any(|s| message.contains(s)) {
        let registry = registry_of(message);
        return Finding::new(
            FindingCode::ImagePullNetwork,
            Severity::Error,
            format!("Node {node} cannot reach registry {registry} to pull {image}"),
            Fix::advice(format!(
                "The container runtime on {node} pulls images itself: pod env and the chart's proxy values do not apply. Give containerd a proxy (or a registry mirror), then restart it."
            ))
            .command("sudo mkdir -p /etc/systemd/system/containerd.service.d")
            .command("printf '[Service]\\nEnvironment=\"HTTP_PROXY=http://<proxy>:3128\"\\nEnvironment=\"HTTPS_PROXY=http://<proxy>:3128\"\\nEnvironment=\"NO_PROXY=localhost,127.0.0.1,10.0.0.0/8,192.168.0.0/16,.svc,.cluster.local\"\\n' | sudo tee /etc/systemd/system/containerd.service.d/http-proxy.conf")
            .command("sudo systemctl daemon-reload && sudo systemctl restart containerd")
            .command(format!("# or a mirror: /etc/containerd/certs.d/{registry}/hosts.toml"))
            .command(format!("kubectl delete pod -n {} {}   # retry the pull now", snapshot.namespace, name(pod))),
        )
        .with_evidence(evidence);
    }
    if message.contains("not found") || message.contains("manifest unknown") {
        return Finding::new(
            FindingCode::ImagePullNotFound,
            Severity::Error,
            format!("Image {image} does not exist in its registry"),
            Fix::advice("Fix the image repository or tag in the chart's values.")
                .values("image:\n  repository: <repository>\n  tag: <existing tag>")
                .command(helm_upgrade(snapshot, Some(pod))),
        )
        .with_evidence(evidence);
    }
    if [
        "unauthorized",
        "pull access denied",
        "authorization failed",
        "401",
        "403 Forbidden",
    ]
    .iter()
    .any(|s| message.contains(s))
    {
        return Finding::new(
            FindingCode::ImagePullAuth,
            Severity::Error,
            format!("The registry refuses to serve {image} without credentials"),
            Fix::advice("Create a docker-registry secret and name it in the chart's imagePullSecrets.")
                .command(format!("kubectl create secret docker-registry regcred -n {} --docker-server=<registry> --docker-username=<user> --docker-password=<token>", snapshot.namespace))
                .values("imagePullSecrets:\n  - name: regcred")
                .command(helm_upgrade(snapshot, Some(pod))),
        )
        .with_evidence(evidence);
    }
    Finding::new(
        FindingCode::ImagePullFailed,
        Severity::Error,
        format!("Pod {} cannot pull image {image}", name(pod)),
        Fix::advice(
            "Read the runtime's error below; try the pull on the node to see it first hand.",
        )
        .command(format!("sudo crictl pull {image}   # on node {node}")),
    )
    .with_evidence(evidence)
}

fn disk_fix(node: &str) -> Fix {
    Fix::advice(format!(
        "Free or grow the container runtime's filesystem on {node} (usually /var/lib/containerd): remove unused images, or extend the disk."
    ))
    .command(format!("sudo crictl rmi --prune   # on node {node}"))
    .command(format!("df -h /var/lib/containerd   # on node {node}"))
}

/// A scheduled pod whose image is not yet on its node, when the image's size is known (from
/// any node's `status.images`) and exceeds the node's free image filesystem.
fn image_too_large(snapshot: &Snapshot, pod: &Pod) -> Option<Finding> {
    let node_name = pod.spec.as_ref()?.node_name.as_deref()?;
    let node = snapshot
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))?;
    let stats = snapshot.node_stats.iter().find(|s| s.node == node_name)?;
    let spec = pod.spec.as_ref()?;
    for container in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        let Some(image) = container.image.as_deref() else {
            continue;
        };
        if node_has_image(node, image) {
            continue;
        }
        let Some(size) = snapshot.nodes.iter().find_map(|n| image_size(n, image)) else {
            continue;
        };
        if size > stats.image_fs_available_bytes {
            return Some(
                Finding::new(
                    FindingCode::ImageLargerThanFreeSpace,
                    Severity::Error,
                    format!(
                        "Pod {}: image {image} ({}) is larger than the free image filesystem on node {node_name} ({})",
                        name(pod),
                        human_bytes(size as f64),
                        human_bytes(stats.image_fs_available_bytes as f64)
                    ),
                    disk_fix(node_name),
                )
                .with_evidence(Evidence::new(
                    format!("Node {node_name}"),
                    None,
                    format!(
                        "image filesystem: {} free of {}",
                        human_bytes(stats.image_fs_available_bytes as f64),
                        human_bytes(stats.image_fs_capacity_bytes as f64)
                    ),
                )),
            );
        }
    }
    None
}

fn image_names(node: &Node) -> impl Iterator<Item = (&String, Option<i64>)> {
    node.status
        .as_ref()
        .and_then(|s| s.images.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|i| i.names.iter().flatten().map(move |n| (n, i.size_bytes)))
}

/// Image references as the runtime lists them (`docker.io/library/x:tag`) or as written.
fn same_image(listed: &str, wanted: &str) -> bool {
    listed == wanted
        || listed.ends_with(&format!("/{wanted}"))
        || listed == format!("docker.io/library/{wanted}")
}

fn node_has_image(node: &Node, image: &str) -> bool {
    image_names(node).any(|(n, _)| same_image(n, image))
}

fn image_size(node: &Node, image: &str) -> Option<u64> {
    image_names(node)
        .find(|(n, _)| same_image(n, image))
        .and_then(|(_, size)| size)
        .map(|s| s.max(0) as u64)
}
