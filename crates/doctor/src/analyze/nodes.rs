//! Node conditions that stop or evict pods: disk, memory and PID pressure, NotReady.

use k8s_openapi::api::core::v1::Node;

use super::scheduling::node_gpus;
use crate::finding::{Evidence, Finding, FindingCode, Fix, Severity};
use crate::snapshot::Snapshot;

pub(super) fn check(snapshot: &Snapshot, findings: &mut Vec<Finding>) {
    for node in &snapshot.nodes {
        let node_name = node.metadata.name.as_deref().unwrap_or_default();
        let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
        for condition in conditions.into_iter().flatten() {
            let bad = match condition.type_.as_str() {
                "Ready" => condition.status != "True",
                "DiskPressure" | "MemoryPressure" | "PIDPressure" => condition.status == "True",
                _ => false,
            };
            if !bad {
                continue;
            }
            let severity = if matters(snapshot, node) {
                Severity::Error
            } else {
                Severity::Warning
            };
            let (code, title, fix) = match condition.type_.as_str() {
                "DiskPressure" => (
                    FindingCode::NodeDiskPressure,
                    format!("Node {node_name} is short of disk (DiskPressure): new pods are refused and pods get evicted"),
                    Fix::advice("Free the node's disk: unused images and containers, old logs; or grow the disk holding /var/lib/containerd and /var/lib/kubelet.")
                        .command(format!("df -h /var/lib/containerd /var/lib/kubelet   # on node {node_name}"))
                        .command(format!("sudo crictl rmi --prune   # on node {node_name}")),
                ),
                "MemoryPressure" => (
                    FindingCode::NodeMemoryPressure,
                    format!("Node {node_name} is short of memory (MemoryPressure)"),
                    Fix::advice("Move or stop other workloads on the node, or give sdkube a node with more memory.")
                        .command("kubectl top pods -A --sort-by=memory | head   # what uses memory (needs metrics-server)")
                        .command(format!("kubectl describe node {node_name}")),
                ),
                "PIDPressure" => (
                    FindingCode::NodePidPressure,
                    format!("Node {node_name} is running out of process ids (PIDPressure)"),
                    Fix::advice("A workload forks without bound; find it on the node.")
                        .command(format!("kubectl describe node {node_name}")),
                ),
                _ => (
                    FindingCode::NodeNotReady,
                    format!("Node {node_name} is not Ready"),
                    Fix::advice("The kubelet on the node is down or cannot reach the API server; check it on the node.")
                        .command(format!("sudo systemctl status kubelet   # on node {node_name}"))
                        .command(format!("sudo journalctl -u kubelet -n 50   # on node {node_name}")),
                ),
            };
            findings.push(
                Finding::new(code, severity, title, fix).with_evidence(Evidence::new(
                    format!("Node {node_name}"),
                    condition.reason.as_deref(),
                    condition.message.clone().unwrap_or_default(),
                )),
            );
        }
    }
}

/// A node matters to sdkube when it has GPUs or runs one of the release's pods.
fn matters(snapshot: &Snapshot, node: &Node) -> bool {
    node_gpus(node) > 0.0
        || snapshot.app_pods().any(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == node.metadata.name.as_deref()
        })
}
