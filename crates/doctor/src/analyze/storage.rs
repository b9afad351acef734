//! PersistentVolumeClaims that keep the model store from being mounted.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;

use super::{event_evidence, helm_upgrade, human_bytes, name, nest, parse_quantity, pod_ref};
use crate::finding::{Evidence, Finding, FindingCode, Fix, Severity};
use crate::snapshot::{Component, Snapshot, APP_NAME, INSTANCE_LABEL, NAME_LABEL};

const DEFAULT_CLASS_ANNOTATIONS: [&str; 2] = [
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
];
const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";

pub(super) fn check(snapshot: &Snapshot, findings: &mut Vec<Finding>) {
    // Claims the release's pods mount, then claims labelled for the release.
    let mut claims: Vec<(String, Option<&Pod>)> = Vec::new();
    for pod in snapshot.app_pods() {
        let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
        for volume in volumes.into_iter().flatten() {
            if let Some(source) = &volume.persistent_volume_claim {
                if !claims.iter().any(|(c, _)| *c == source.claim_name) {
                    claims.push((source.claim_name.clone(), Some(pod)));
                }
            }
        }
    }
    for pvc in &snapshot.pvcs {
        let name = pvc.metadata.name.clone().unwrap_or_default();
        if is_release_claim(snapshot, pvc) && !claims.iter().any(|(c, _)| *c == name) {
            claims.push((name, None));
        }
    }
    for (claim, pod) in claims {
        match snapshot
            .pvcs
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(claim.as_str()))
        {
            Some(pvc) => check_claim(snapshot, pvc, pod, findings),
            None => {
                if let Some(pod) = pod {
                    findings.push(missing_claim(snapshot, &claim, pod));
                }
            }
        }
    }
}

fn is_release_claim(snapshot: &Snapshot, pvc: &PersistentVolumeClaim) -> bool {
    let labels = pvc.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    label(NAME_LABEL) == Some(APP_NAME)
        && snapshot
            .release
            .as_deref()
            .is_none_or(|r| label(INSTANCE_LABEL) == Some(r))
}

/// Whether a claim holds the bundled Redis's data (its pod, or its claim template's label).
fn is_redis_claim(pvc: Option<&PersistentVolumeClaim>, pod: Option<&Pod>) -> bool {
    pod.map(Component::of_pod) == Some(Component::Redis)
        || pvc.is_some_and(|c| Component::of(c.metadata.labels.as_ref()) == Component::Redis)
}

/// A `persistence:` snippet for the claim's owner: the models' volume, or Redis's.
fn claim_values(redis: bool, yaml: &str) -> String {
    if redis && yaml.starts_with("persistence:") {
        nest(Component::Redis.values_path(), yaml)
    } else {
        yaml.to_owned()
    }
}

/// The models' advice for Redis's claim: there is no local-volume option for Redis, a claim
/// of your own (bound to a PersistentVolume you made) stands in for it.
fn redis_advice(advice: &str) -> String {
    const OWN: &str = "give Redis a claim bound to a PersistentVolume of your own (queue.redis.bundled.persistence.existingClaim)";
    advice
        .replace(
            "Let the chart create a local volume on the GPU node",
            &capitalised(OWN),
        )
        .replace("use a local volume on the GPU node", OWN)
        .replace("let the chart create a local volume", OWN)
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn missing_claim(snapshot: &Snapshot, claim: &str, pod: &Pod) -> Finding {
    let mut finding = Finding::new(
        FindingCode::PvcMissing,
        Severity::Error,
        format!("Pod {} mounts PVC {claim}, which does not exist", name(pod)),
        Fix::advice("Create the claim, or point the chart at one that exists.")
            .values(claim_values(
                is_redis_claim(None, Some(pod)),
                "persistence:\n  existingClaim: <an existing PVC in this namespace>",
            ))
            .command(helm_upgrade(snapshot, Some(pod))),
    );
    if let Some(evidence) = scheduling_evidence(snapshot, pod) {
        finding.evidence.push(evidence);
    }
    finding
}

/// The pod's FailedScheduling event when it is about volumes.
fn scheduling_evidence(snapshot: &Snapshot, pod: &Pod) -> Option<Evidence> {
    snapshot
        .events_for("Pod", name(pod))
        .into_iter()
        .rev()
        .find(|e| {
            e.reason.as_deref() == Some("FailedScheduling")
                && e.message.as_deref().is_some_and(|m| {
                    m.contains("PersistentVolumeClaim") || m.contains("persistentvolumeclaim")
                })
        })
        .map(|e| event_evidence(&pod_ref(pod), e))
}

fn check_claim(
    snapshot: &Snapshot,
    pvc: &PersistentVolumeClaim,
    pod: Option<&Pod>,
    findings: &mut Vec<Finding>,
) {
    let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Pending") {
        return;
    }
    let claim = pvc.metadata.name.as_deref().unwrap_or_default();
    let object = format!("PersistentVolumeClaim {}/{claim}", snapshot.namespace);
    let mut evidence: Vec<Evidence> = snapshot
        .events_for("PersistentVolumeClaim", claim)
        .into_iter()
        .rev()
        .take(2)
        .map(|e| event_evidence(&object, e))
        .collect();
    if evidence.is_empty() {
        evidence.push(Evidence::new(
            &object,
            Some("Pending"),
            "the claim is not bound to a volume",
        ));
    }
    if let Some(e) = pod.and_then(|p| scheduling_evidence(snapshot, p)) {
        evidence.push(e);
    }
    let class = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref());
    let storage_class = class.and_then(|c| {
        snapshot
            .storage_classes
            .iter()
            .find(|sc| sc.metadata.name.as_deref() == Some(c))
    });
    let recreate = format!("kubectl delete pvc -n {} {claim}   # a StatefulSet's claim keeps its old spec: delete it, then upgrade", snapshot.namespace);
    let redis = is_redis_claim(Some(pvc), pod);
    // Redis's claim has no local-volume option: a claim of your own, or no volume.
    let local_volume_values = if redis {
        "queue:\n  redis:\n    bundled:\n      persistence:\n        existingClaim: <a PVC bound to a PV you created>\n        # or no volume (queued jobs are lost when Redis restarts):\n        # enabled: false".to_owned()
    } else {
        format!(
            "persistence:\n  localVolume:\n    enabled: true\n    path: /var/lib/sdkube/models\n    nodeName: {}",
            gpu_node_name(snapshot).unwrap_or("<GPU node>")
        )
    };

    let mut finding = match (class, storage_class) {
        (None | Some(""), _) => {
            let classes = class_names(&snapshot.storage_classes);
            let default = default_class(&snapshot.storage_classes);
            let (title, fix) = match (class, default, classes.first()) {
                (None, Some(default), _) => (
                    format!("PVC {claim} is Pending: it was created without a class, before {default} became the default"),
                    Fix::advice(format!("Delete the claim so that it is recreated with the default class {default}."))
                        .command(recreate.clone())
                        .command(helm_upgrade(snapshot, pod)),
                ),
                (_, _, Some(first)) => (
                    format!("PVC {claim} is Pending: it names no StorageClass and no class is the default"),
                    Fix::advice(format!(
                        "Name a class in the chart (existing: {}), or make one the default, or use a local volume on the GPU node.",
                        classes.join(", ")
                    ))
                    .values(format!("persistence:\n  storageClass: {first}"))
                    .command(format!(
                        "kubectl patch storageclass {first} -p '{{\"metadata\":{{\"annotations\":{{\"storageclass.kubernetes.io/is-default-class\":\"true\"}}}}}}'"
                    ))
                    .command(recreate.clone())
                    .command(helm_upgrade(snapshot, pod)),
                ),
                _ => (
                    format!("PVC {claim} is Pending: it names no StorageClass and the cluster has no StorageClass at all"),
                    Fix::advice("No volume can be provisioned. Let the chart create a local volume on the GPU node (or install a provisioner such as local-path-provisioner and name its class).")
                        .values(local_volume_values.clone())
                        .command(recreate.clone())
                        .command(helm_upgrade(snapshot, pod)),
                ),
            };
            Finding::new(FindingCode::PvcNoStorageClass, Severity::Error, title, fix)
        }
        (Some(class), None) => {
            let static_volumes: Vec<&PersistentVolume> = snapshot
                .pvs
                .iter()
                .filter(|pv| pv_class(pv) == class)
                .collect();
            if static_volumes.is_empty() {
                let classes = class_names(&snapshot.storage_classes);
                let fix = match classes.first() {
                    Some(first) => {
                        Fix::advice(format!("Use a class that exists: {}.", classes.join(", ")))
                            .values(format!("persistence:\n  storageClass: {first}"))
                    }
                    None => Fix::advice(
                        "The cluster has no StorageClass; use a local volume on the GPU node.",
                    )
                    .values(local_volume_values.clone()),
                };
                Finding::new(
                    FindingCode::PvcStorageClassMissing,
                    Severity::Error,
                    format!("PVC {claim} asks for StorageClass {class}, which does not exist (and no volume has that class)"),
                    fix.command(recreate.clone()).command(helm_upgrade(snapshot, pod)),
                )
            } else {
                no_matching_volume(
                    snapshot,
                    pvc,
                    class,
                    &static_volumes,
                    &local_volume_values,
                    &recreate,
                    pod,
                )
            }
        }
        (Some(class), Some(sc)) => {
            let waits = sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
            let static_volumes: Vec<&PersistentVolume> = snapshot
                .pvs
                .iter()
                .filter(|pv| pv_class(pv) == class)
                .collect();
            if waits {
                let consumer_scheduled = pod
                    .is_some_and(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some());
                match pod {
                    Some(p) if !consumer_scheduled => Finding::new(
                        FindingCode::PvcWaitForFirstConsumer,
                        Severity::Info,
                        format!("PVC {claim} waits for pod {} to be scheduled (class {class} binds on first consumer)", name(p)),
                        Fix::advice("Nothing to do for the claim itself: fix why the pod is not scheduled (see the other findings)."),
                    ),
                    Some(_) if sc.provisioner == NO_PROVISIONER => no_matching_volume(
                        snapshot, pvc, class, &static_volumes, &local_volume_values, &recreate, pod,
                    ),
                    Some(_) => provisioning(snapshot, claim, sc, pod),
                    // Workers scaled to zero (KEDA, while the queue is empty): it binds
                    // when the first one starts.
                    None if mounted_by_idle_workload(snapshot, claim) => Finding::new(
                        FindingCode::PvcWaitForFirstConsumer,
                        Severity::Info,
                        format!("PVC {claim} waits for its first pod: the workers that mount it are scaled to zero"),
                        Fix::advice("Nothing to do: the claim binds when the first worker starts (with the first job, under KEDA)."),
                    ),
                    None => Finding::new(
                        FindingCode::PvcWaitForFirstConsumer,
                        Severity::Warning,
                        format!("PVC {claim} waits for a first consumer, but no sdkube pod uses it"),
                        Fix::advice("Check that the release's pods exist (see `kubectl get statefulset,deploy`)."),
                    ),
                }
            } else if sc.provisioner == NO_PROVISIONER {
                no_matching_volume(
                    snapshot,
                    pvc,
                    class,
                    &static_volumes,
                    &local_volume_values,
                    &recreate,
                    pod,
                )
            } else {
                provisioning(snapshot, claim, sc, pod)
            }
        }
    };
    let classes_read = !snapshot.not_read.iter().any(|g| g.what == "storageclasses");
    if !classes_read
        && matches!(
            finding.code,
            FindingCode::PvcNoStorageClass | FindingCode::PvcStorageClassMissing
        )
    {
        // Without the StorageClass list the diagnosis is a guess: say so.
        finding
            .title
            .push_str(" (unverified: StorageClasses could not be read)");
        finding.severity = Severity::Warning;
    }
    if redis {
        finding.fix.advice = redis_advice(&finding.fix.advice);
        finding.fix.values = finding.fix.values.map(|v| claim_values(true, &v));
        finding
            .title
            .push_str(" — it holds the bundled Redis's data: no job can be queued until it binds");
    }
    let mut all = evidence;
    all.append(&mut finding.evidence);
    finding.evidence = all;
    findings.push(finding);
}

/// Whether a Deployment of the release scaled to zero mounts the claim.
fn mounted_by_idle_workload(snapshot: &Snapshot, claim: &str) -> bool {
    snapshot.deployments.iter().any(|d| {
        let spec = d.spec.as_ref();
        spec.and_then(|s| s.replicas) == Some(0)
            && spec
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|s| s.volumes.as_ref())
                .into_iter()
                .flatten()
                .any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == claim)
                })
    })
}

fn provisioning(snapshot: &Snapshot, claim: &str, sc: &StorageClass, pod: Option<&Pod>) -> Finding {
    let class = sc.metadata.name.as_deref().unwrap_or_default();
    Finding::new(
        FindingCode::PvcProvisioning,
        Severity::Error,
        format!(
            "PVC {claim} is Pending: provisioner {} of class {class} has not created a volume",
            sc.provisioner
        ),
        Fix::advice(
            "Check that the provisioner is running and read its logs; or name another class.",
        )
        .command(format!(
            "kubectl get pods -A | grep -i {}",
            provisioner_short(&sc.provisioner)
        ))
        .command(format!(
            "kubectl describe pvc -n {} {claim}",
            snapshot.namespace
        ))
        .values("persistence:\n  storageClass: <another class>")
        .command(helm_upgrade(snapshot, pod)),
    )
}

fn provisioner_short(provisioner: &str) -> &str {
    provisioner.rsplit('/').next().unwrap_or(provisioner)
}

/// A static class (or a class with volumes but no StorageClass object): say why each volume
/// of that class does not fit the claim.
fn no_matching_volume(
    snapshot: &Snapshot,
    pvc: &PersistentVolumeClaim,
    class: &str,
    volumes: &[&PersistentVolume],
    local_volume_values: &str,
    recreate: &str,
    pod: Option<&Pod>,
) -> Finding {
    let claim = pvc.metadata.name.as_deref().unwrap_or_default();
    let wanted = claim_request(pvc);
    let modes: Vec<String> = pvc
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    let mut finding = Finding::new(
        FindingCode::PvcNoMatchingVolume,
        Severity::Error,
        format!(
            "PVC {claim} is Pending: no PersistentVolume of class {class} fits it ({}{})",
            wanted.map(human_bytes).unwrap_or_else(|| "any size".into()),
            if modes.is_empty() { String::new() } else { format!(", {}", modes.join(",")) }
        ),
        Fix::advice(format!(
            "Create a PersistentVolume of class {class} with at least the requested size and access mode, or let the chart create a local volume."
        ))
        .values(local_volume_values.to_owned())
        .command(recreate.to_owned())
        .command(helm_upgrade(snapshot, pod)),
    );
    if volumes.is_empty() {
        finding.evidence.push(Evidence::new(
            format!("StorageClass {class}"),
            None,
            format!("no PersistentVolume of class {class} exists (the class has no provisioner: volumes must be created by hand)"),
        ));
    }
    for pv in volumes {
        let pv_name = pv.metadata.name.as_deref().unwrap_or_default();
        let mut reasons = Vec::new();
        let phase = pv
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Unknown");
        if phase != "Available" {
            let holder = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .map(|r| {
                    format!(
                        " by {}/{}",
                        r.namespace.as_deref().unwrap_or_default(),
                        r.name.as_deref().unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            reasons.push(format!("it is {phase}{holder}"));
        }
        let capacity = pv
            .spec
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .and_then(|q| parse_quantity(&q.0));
        if let (Some(have), Some(want)) = (capacity, wanted) {
            if have < want {
                reasons.push(format!(
                    "its capacity {} is smaller than the {} requested",
                    human_bytes(have),
                    human_bytes(want)
                ));
            }
        }
        let pv_modes = pv
            .spec
            .as_ref()
            .and_then(|s| s.access_modes.clone())
            .unwrap_or_default();
        let missing: Vec<&String> = modes.iter().filter(|m| !pv_modes.contains(m)).collect();
        if !missing.is_empty() {
            reasons.push(format!(
                "it offers access modes [{}], not {}",
                pv_modes.join(","),
                missing
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        if !reasons.is_empty() {
            finding.evidence.push(Evidence::new(
                format!("PersistentVolume {pv_name}"),
                None,
                reasons.join("; "),
            ));
        }
    }
    finding
}

fn claim_request(pvc: &PersistentVolumeClaim) -> Option<f64> {
    pvc.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| parse_quantity(&q.0))
}

fn pv_class(pv: &PersistentVolume) -> &str {
    pv.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

fn class_names(classes: &[StorageClass]) -> Vec<String> {
    classes
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect()
}

fn default_class(classes: &[StorageClass]) -> Option<&str> {
    classes
        .iter()
        .find(|c| {
            c.metadata.annotations.as_ref().is_some_and(|a| {
                DEFAULT_CLASS_ANNOTATIONS
                    .iter()
                    .any(|key| a.get(*key).map(String::as_str) == Some("true"))
            })
        })
        .and_then(|c| c.metadata.name.as_deref())
}

/// The first node advertising GPUs, for `localVolume.nodeName` suggestions.
fn gpu_node_name(snapshot: &Snapshot) -> Option<&str> {
    snapshot
        .nodes
        .iter()
        .find(|n| super::scheduling::node_gpus(n) > 0.0)
        .and_then(|n| n.metadata.name.as_deref())
}
