//! Pods the scheduler cannot place: GPUs, node selectors, taints, other resources.

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Taint, Toleration};

use super::{
    event_evidence, helm_upgrade, holds_resources, name, parse_quantity, pod_ref, pod_request,
    values_for, GPU_RESOURCE,
};
use crate::finding::{Evidence, Finding, FindingCode, Fix, Severity};
use crate::snapshot::Snapshot;

/// GPUs a node offers to pods (`status.allocatable["nvidia.com/gpu"]`).
pub(crate) fn node_gpus(node: &Node) -> f64 {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
        .and_then(|a| a.get(GPU_RESOURCE))
        .and_then(|q| parse_quantity(&q.0))
        .unwrap_or(0.0)
}

fn node_name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or_default()
}

pub(super) fn check(snapshot: &Snapshot, findings: &mut Vec<Finding>) {
    for pod in snapshot.app_pods() {
        let scheduled = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if scheduled || phase != Some("Pending") {
            continue;
        }
        let Some(evidence) = scheduling_failure(snapshot, pod) else {
            continue;
        };
        let message = evidence.message.clone();
        let before = findings.len();
        // Without the nodes (not readable), only the scheduler's own words can be reported.
        let message = if snapshot.nodes.is_empty() {
            String::new()
        } else {
            message
        };
        // The scheduler lists a reason per node; only the nodes sdkube could run on matter.
        let wants_gpu = pod_request(pod, GPU_RESOURCE) > 0.0;
        let selected: Vec<&Node> = snapshot.nodes.iter().filter(|n| selects(pod, n)).collect();
        let gpu_nodes = snapshot.nodes.iter().filter(|n| node_gpus(n) > 0.0).count();
        let selected_gpu = selected.iter().filter(|n| node_gpus(n) > 0.0).count();
        let selector_problem = if wants_gpu && gpu_nodes > 0 {
            selected_gpu == 0
        } else {
            selected.is_empty()
        };
        let selector_reason = message.contains("didn't match Pod's node affinity/selector")
            || message.contains("didn't match node selector");
        if selector_reason && (selector_problem || snapshot.nodes.is_empty()) {
            findings.push(selector_mismatch(snapshot, pod, evidence.clone()));
        }
        let candidates: Vec<&Node> = selected
            .iter()
            .copied()
            .filter(|n| !wants_gpu || gpu_nodes == 0 || node_gpus(n) > 0.0)
            .collect();
        // When every candidate node is tainted, the taint is the problem, not the GPU count.
        let all_tainted =
            !candidates.is_empty() && candidates.iter().all(|n| tainted_against(pod, n));
        if !selector_problem
            && !all_tainted
            && message.contains(&format!("Insufficient {GPU_RESOURCE}"))
        {
            if let Some(f) = gpu_shortage(snapshot, pod, evidence.clone(), &candidates) {
                findings.push(f);
            }
        }
        if !selector_problem
            && all_tainted
            && (message.contains("untolerated taint") || message.contains("had taint"))
        {
            findings.push(untolerated_taints(
                snapshot,
                pod,
                evidence.clone(),
                &candidates,
            ));
        }
        for resource in ["cpu", "memory", "ephemeral-storage"] {
            if message.contains(&format!("Insufficient {resource}")) {
                findings.push(Finding::new(
                    FindingCode::InsufficientResource,
                    Severity::Error,
                    format!("Pod {} asks for more {resource} than any node has free", name(pod)),
                    Fix::advice(format!("Lower the {resource} request in the chart's resources, or free {resource} on the GPU node."))
                        .values(values_for(Some(pod), &format!("resources:\n  requests:\n    {resource}: <smaller>")))
                        .command("kubectl describe node <GPU node>   # see Allocated resources")
                        .command(helm_upgrade(snapshot, Some(pod))),
                ).with_evidence(evidence.clone()));
            }
        }
        // Volume reasons are reported by the storage check, with this event as evidence.
        let full = &evidence.message;
        let about_volumes = full.contains("PersistentVolumeClaim")
            || full.contains("persistentvolumeclaim")
            || full.contains("volume node affinity");
        if findings.len() == before && !about_volumes {
            findings.push(
                Finding::new(
                    FindingCode::Unschedulable,
                    Severity::Error,
                    format!("Pod {} cannot be scheduled", name(pod)),
                    Fix::advice("Read the scheduler's reasons below; `kubectl describe pod` has the full picture.")
                        .command(format!("kubectl describe pod -n {} {}", snapshot.namespace, name(pod))),
                )
                .with_evidence(evidence),
            );
        }
    }
}

/// The scheduler's latest complaint about the pod: its FailedScheduling event, or, once
/// events have expired, the `PodScheduled` condition that carries the same message.
fn scheduling_failure(snapshot: &Snapshot, pod: &Pod) -> Option<Evidence> {
    let object = pod_ref(pod);
    if let Some(event) = snapshot
        .events_for("Pod", name(pod))
        .into_iter()
        .rev()
        .find(|e| e.reason.as_deref() == Some("FailedScheduling"))
    {
        return Some(event_evidence(&object, event));
    }
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        })
        .map(|c| {
            Evidence::new(
                object,
                c.reason.as_deref(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

/// The pods holding GPUs on `node` (other than `pod`), and how many GPUs they hold.
fn gpu_holders<'a>(snapshot: &'a Snapshot, node: &Node, pod: &Pod) -> (Vec<&'a Pod>, f64) {
    let on_node: Vec<&Pod> = snapshot
        .pods
        .iter()
        .filter(|p| {
            holds_resources(p)
                && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name(node))
                && pod_request(p, GPU_RESOURCE) > 0.0
                && !(p.metadata.namespace == pod.metadata.namespace
                    && p.metadata.name == pod.metadata.name)
        })
        .collect();
    let used = on_node.iter().map(|p| pod_request(p, GPU_RESOURCE)).sum();
    (on_node, used)
}

fn gpu_shortage(
    snapshot: &Snapshot,
    pod: &Pod,
    evidence: Evidence,
    candidates: &[&Node],
) -> Option<Finding> {
    let wanted = pod_request(pod, GPU_RESOURCE).max(1.0);
    let gpu_nodes: Vec<&Node> = candidates
        .iter()
        .copied()
        .filter(|n| node_gpus(n) > 0.0)
        .collect();
    // A GPU node with room means the shortage was on other nodes: not our problem.
    if gpu_nodes
        .iter()
        .any(|n| node_gpus(n) - gpu_holders(snapshot, n, pod).1 >= wanted)
    {
        return None;
    }
    if gpu_nodes.is_empty() {
        let names: Vec<&str> = snapshot.nodes.iter().map(node_name).collect();
        return Some(Finding::new(
            FindingCode::GpuNotAdvertised,
            Severity::Error,
            format!("No node advertises {GPU_RESOURCE}: the NVIDIA device plugin (GPU operator) is missing or not working"),
            Fix::advice("Install the NVIDIA GPU operator (or the device plugin) and check that its pods run on the GPU node; the node must then show nvidia.com/gpu under Allocatable.")
                .command("helm repo add nvidia https://helm.ngc.nvidia.com/nvidia && helm repo update")
                .command("helm install --wait gpu-operator -n gpu-operator --create-namespace nvidia/gpu-operator")
                .command("kubectl get pods -n gpu-operator")
                .command("kubectl describe node <GPU node> | grep -A8 Allocatable"),
        )
        .with_evidence(evidence)
        .with_evidence(Evidence::new(
            "Nodes",
            None,
            format!("no node has {GPU_RESOURCE} in status.allocatable (nodes: {})", names.join(", ")),
        )));
    }
    let mut finding = Finding::new(
        FindingCode::GpuAllAllocated,
        Severity::Error,
        String::new(),
        Fix::default(),
    )
    .with_evidence(evidence);
    let mut holders: Vec<&Pod> = Vec::new();
    for node in &gpu_nodes {
        let (on_node, used) = gpu_holders(snapshot, node, pod);
        let mut message = format!("{} of {} GPU(s) allocated", used, node_gpus(node));
        if !on_node.is_empty() {
            let names: Vec<String> = on_node
                .iter()
                .map(|p| {
                    format!(
                        "{} ({})",
                        pod_ref(p).trim_start_matches("Pod "),
                        pod_request(p, GPU_RESOURCE)
                    )
                })
                .collect();
            message.push_str(&format!(" to {}", names.join(", ")));
        }
        finding.evidence.push(Evidence::new(
            format!("Node {}", node_name(node)),
            None,
            message,
        ));
        holders.extend(on_node);
    }
    let cluster_pods_read = !snapshot
        .not_read
        .iter()
        .any(|g| g.what.contains("all namespaces"));
    if holders.is_empty() {
        finding.title = format!(
            "Every GPU is taken, but no pod visible here holds one (pod asks for {wanted})"
        );
        finding.fix = Fix::advice(if cluster_pods_read {
            "Ask for fewer GPUs, or check the nodes' allocated resources."
        } else {
            "Pods in other namespaces could not be listed; look for GPU pods there."
        })
        .command("kubectl get pods -A -o wide --field-selector=status.phase=Running")
        .values(format!("gpu:\n  count: {}", (wanted - 1.0).max(1.0)));
        return Some(finding);
    }
    let others: Vec<&&Pod> = holders.iter().filter(|p| !snapshot.is_app_pod(p)).collect();
    let names: Vec<String> = holders
        .iter()
        .map(|p| pod_ref(p).trim_start_matches("Pod ").to_owned())
        .collect();
    finding.title = format!(
        "All GPUs are allocated (pod {} asks for {wanted}); held by {}",
        name(pod),
        names.join(", ")
    );
    let mut fix = Fix::advice(
        "Delete the pods holding the GPUs if they are left over (e.g. the GPU operator's test pod), or ask for fewer GPUs.",
    );
    for p in others {
        fix = fix.command(format!(
            "kubectl delete pod -n {} {}",
            p.metadata.namespace.as_deref().unwrap_or_default(),
            name(p)
        ));
    }
    if wanted > 1.0 {
        fix = fix.values("gpu:\n  count: 1");
    }
    finding.fix = fix;
    Some(finding)
}

fn selector_mismatch(snapshot: &Snapshot, pod: &Pod, evidence: Evidence) -> Finding {
    let spec = pod.spec.as_ref();
    let selector = spec
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    let mut unmatched: Vec<(String, String)> = Vec::new();
    for (key, value) in &selector {
        let any = snapshot
            .nodes
            .iter()
            .any(|n| n.metadata.labels.as_ref().and_then(|l| l.get(key)) == Some(value));
        if !any {
            unmatched.push((key.clone(), value.clone()));
        }
    }
    let affinity_terms = spec
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    let affinity_matches = |node: &Node| {
        affinity_terms.is_empty()
            || affinity_terms.iter().any(|term| {
                term.match_expressions
                    .iter()
                    .flatten()
                    .all(|req| requirement_matches(node, req))
            })
    };
    let gpu_nodes: Vec<&Node> = snapshot
        .nodes
        .iter()
        .filter(|n| node_gpus(n) > 0.0)
        .collect();
    let target = gpu_nodes
        .first()
        .map(|n| node_name(n))
        .unwrap_or("<GPU node>");
    let mut finding = Finding::new(
        FindingCode::NodeSelectorMismatch,
        Severity::Error,
        String::new(),
        Fix::default(),
    )
    .with_evidence(evidence);
    if !unmatched.is_empty() {
        let labels: Vec<String> = unmatched.iter().map(|(k, v)| format!("{k}={v}")).collect();
        finding.title = format!(
            "Pod {} selects nodes labelled {}, and no node has that label",
            name(pod),
            labels.join(",")
        );
        for node in &gpu_nodes {
            finding.evidence.push(Evidence::new(
                format!("Node {}", node_name(node)),
                None,
                format!(
                    "has {} {GPU_RESOURCE} but lacks the label {}",
                    node_gpus(node),
                    labels.join(",")
                ),
            ));
        }
        let gfd = unmatched.iter().any(|(k, _)| k.starts_with("nvidia.com/"));
        let mut fix = Fix::advice(if gfd {
            "nvidia.com/* labels come from GPU feature discovery (part of the GPU operator): install it, or label the GPU node yourself, or drop the selector."
        } else {
            "Label the node that should run sdkube, or change the chart's nodeSelector."
        });
        for (k, v) in &unmatched {
            fix = fix.command(format!("kubectl label node {target} {k}={v}"));
        }
        finding.fix = fix.values(values_for(Some(pod), "nodeSelector: {}"));
    } else {
        let matching: Vec<&str> = snapshot
            .nodes
            .iter()
            .filter(|n| affinity_matches(n))
            .map(node_name)
            .collect();
        finding.title = format!(
            "Pod {}'s node selector or required node affinity matches no schedulable node",
            name(pod)
        );
        finding.evidence.push(Evidence::new(
            "Nodes",
            None,
            if matching.is_empty() {
                "no node satisfies the required node affinity".to_owned()
            } else {
                format!(
                    "nodes matching the affinity: {} (they fail other checks)",
                    matching.join(", ")
                )
            },
        ));
        finding.fix = Fix::advice("Compare the pod's affinity with the node labels; relax the chart's nodeSelector/affinity.")
            .command("kubectl get nodes --show-labels")
            .values(values_for(Some(pod), "nodeSelector: {}"));
    }
    finding.fix = finding.fix.command(helm_upgrade(snapshot, Some(pod)));
    finding
}

fn requirement_matches(node: &Node, req: &NodeSelectorRequirement) -> bool {
    let value = node.metadata.labels.as_ref().and_then(|l| l.get(&req.key));
    let values = req.values.clone().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if req.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == taint.key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

/// Taints that keep pods off a node and that the pod does not tolerate.
fn untolerated(pod: &Pod, node: &Node) -> Vec<Taint> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.effect != "PreferNoSchedule" && !tolerates(&tolerations, t))
        .collect()
}

fn tainted_against(pod: &Pod, node: &Node) -> bool {
    !untolerated(pod, node).is_empty()
}

/// Whether the pod's nodeSelector and required node affinity accept the node.
fn selects(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    let affinity_ok = terms.is_empty()
        || terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .all(|req| requirement_matches(node, req))
        });
    selector_ok && affinity_ok
}

/// Taints set by the kubelet or node controller for a node condition: the cure is the
/// condition, not a toleration.
fn condition_taint(taint: &Taint) -> bool {
    taint.key.starts_with("node.kubernetes.io/")
}

fn untolerated_taints(
    snapshot: &Snapshot,
    pod: &Pod,
    evidence: Evidence,
    nodes: &[&Node],
) -> Finding {
    let mut finding = Finding::new(
        FindingCode::UntoleratedTaint,
        Severity::Error,
        String::new(),
        Fix::default(),
    )
    .with_evidence(evidence);
    let mut snippet = String::from("tolerations:\n");
    let mut commands = Vec::new();
    let mut described = Vec::new();
    let mut conditions = false;
    for node in nodes {
        for taint in untolerated(pod, node) {
            let text = match taint.value.as_deref() {
                Some(v) if !v.is_empty() => format!("{}={v}:{}", taint.key, taint.effect),
                _ => format!("{}:{}", taint.key, taint.effect),
            };
            described.push(format!("{} ({text})", node_name(node)));
            if condition_taint(&taint) {
                conditions = true;
                finding.evidence.push(Evidence::new(
                    format!("Node {}", node_name(node)),
                    None,
                    format!("taint {text} is set by Kubernetes for a node condition; fix the condition (see the node's finding), do not tolerate it"),
                ));
                continue;
            }
            finding.evidence.push(Evidence::new(
                format!("Node {}", node_name(node)),
                None,
                format!("taint {text} is not tolerated by the pod"),
            ));
            match taint.value.as_deref() {
                Some(v) if !v.is_empty() => snippet.push_str(&format!(
                    "  - key: {}\n    operator: Equal\n    value: \"{v}\"\n    effect: {}\n",
                    taint.key, taint.effect
                )),
                _ => snippet.push_str(&format!(
                    "  - key: {}\n    operator: Exists\n    effect: {}\n",
                    taint.key, taint.effect
                )),
            }
            commands.push(format!("kubectl taint node {} {}-", node_name(node), text));
        }
    }
    finding.title = if described.is_empty() {
        format!("Pod {} does not tolerate the nodes' taints", name(pod))
    } else {
        format!(
            "Pod {} does not tolerate the taint on {}",
            name(pod),
            described.join(", ")
        )
    };
    let mut fix = Fix::advice(if conditions && commands.is_empty() {
        "The node is tainted because of its condition (disk, memory, not ready): fix that and the taint goes away."
    } else {
        "Add a toleration in the chart's values, or remove the taint if it is not wanted."
    });
    let commands_empty = commands.is_empty();
    if !commands_empty {
        fix = fix.values(values_for(Some(pod), snippet.trim_end()));
    }
    for c in commands {
        fix = fix.command(c);
    }
    if !commands_empty {
        fix = fix.command(helm_upgrade(snapshot, Some(pod)));
    }
    finding.fix = fix;
    finding
}
