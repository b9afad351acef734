//! Everything `analyze` looks at: the API objects read from the cluster and the log tails.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use serde::Serialize;

/// Label every sdkube pod carries (set by the Helm chart).
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Label carrying the Helm release name.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Value of [`NAME_LABEL`] on sdkube pods.
pub const APP_NAME: &str = "sdkube";
/// The chart's init container that downloads models (`sdkube fetch --progress json`).
pub const INIT_CONTAINER: &str = "fetch-models";
/// The chart's main container.
pub const MAIN_CONTAINER: &str = "sdkube";
/// Label naming what a pod is in the release: `server` (one process, the queue in memory),
/// or with a shared queue `api`, `worker` and `redis` (the bundled Redis).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

/// What a pod of the release is, from its [`COMPONENT_LABEL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The single server (`queue.backend: memory`), or a pod without the label.
    Server,
    /// The UI and APIs of a shared queue (no GPU).
    Api,
    /// A GPU worker of a shared queue.
    Worker,
    /// The chart's bundled Redis.
    Redis,
}

impl Component {
    /// The component a pod with these labels belongs to.
    pub fn of(labels: Option<&std::collections::BTreeMap<String, String>>) -> Component {
        match labels
            .and_then(|l| l.get(COMPONENT_LABEL))
            .map(String::as_str)
        {
            Some("api") => Component::Api,
            Some("worker") => Component::Worker,
            Some("redis") => Component::Redis,
            _ => Component::Server,
        }
    }

    /// The component of `pod`.
    pub fn of_pod(pod: &Pod) -> Component {
        Component::of(pod.metadata.labels.as_ref())
    }

    /// Where the chart's values for this component's pods live (`resources`, `nodeSelector`,
    /// `tolerations`, `persistence`…): top level for the server and the workers.
    pub fn values_path(self) -> &'static [&'static str] {
        match self {
            Component::Server | Component::Worker => &[],
            Component::Api => &["api"],
            Component::Redis => &["queue", "redis", "bundled"],
        }
    }
}

/// A KEDA `ScaledObject` (keda.sh/v1alpha1), the fields the diagnosis reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScaledObject {
    /// Its name.
    pub name: String,
    /// `scaleTargetRef`: kind (Deployment by default) and name.
    pub target_kind: String,
    /// The name of the object it scales.
    pub target_name: String,
    /// `minReplicaCount`.
    pub min_replicas: Option<i64>,
    /// `maxReplicaCount`.
    pub max_replicas: Option<i64>,
    /// `(type, stream)` of each trigger (the stream for redis-streams triggers).
    pub triggers: Vec<(String, Option<String>)>,
    /// `status.conditions`: Ready (KEDA can read the triggers), Active (something to do), Fallback,
    /// Paused.
    pub conditions: Vec<ObjectCondition>,
}

/// One entry of an object's `status.conditions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ObjectCondition {
    /// The condition's type (`Ready`, `Active`…).
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Why, in a word.
    pub reason: Option<String>,
    /// Why, in a sentence.
    pub message: Option<String>,
}

impl ScaledObject {
    /// From the object as the API server (or `kubectl get -o json`) gives it.
    pub fn from_json(object: &serde_json::Value) -> ScaledObject {
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        let spec = &object["spec"];
        let target = &spec["scaleTargetRef"];
        ScaledObject {
            name: text(&object["metadata"]["name"]).unwrap_or_default(),
            target_kind: text(&target["kind"]).unwrap_or_else(|| "Deployment".to_owned()),
            target_name: text(&target["name"]).unwrap_or_default(),
            min_replicas: spec["minReplicaCount"].as_i64(),
            max_replicas: spec["maxReplicaCount"].as_i64(),
            triggers: spec["triggers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        text(&t["type"]).unwrap_or_default(),
                        text(&t["metadata"]["stream"]),
                    )
                })
                .collect(),
            conditions: object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| ObjectCondition {
                    type_: text(&c["type"]).unwrap_or_default(),
                    status: text(&c["status"]).unwrap_or_default(),
                    reason: text(&c["reason"]).filter(|r| !r.is_empty()),
                    message: text(&c["message"]).filter(|m| !m.is_empty()),
                })
                .collect(),
        }
    }

    /// The condition of type `type_`.
    pub fn condition(&self, type_: &str) -> Option<&ObjectCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// What a pod answered on one of sdkube's open paths (`/readyz`, `/metrics`), read through
/// the API server's pod proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodAnswer {
    /// The pod.
    pub pod: String,
    /// The path asked.
    pub path: String,
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: String,
}

/// The last lines a container wrote, as `kubectl logs --tail` gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerLog {
    /// The pod.
    pub pod: String,
    /// The container.
    pub container: String,
    /// Its last lines, oldest first.
    pub lines: Vec<String>,
}

/// Free space of a node's image filesystem, from the kubelet summary API
/// (`/api/v1/nodes/{node}/proxy/stats/summary`, `node.runtime.imageFs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeFsStats {
    /// The node.
    pub node: String,
    /// Bytes free.
    pub image_fs_available_bytes: u64,
    /// Bytes in all.
    pub image_fs_capacity_bytes: u64,
}

/// A part of the cluster that could not be read, and why (usually RBAC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotRead {
    /// What could not be read ("nodes", "events"…).
    pub what: String,
    /// The API server's reason.
    pub reason: String,
}

/// The objects one diagnosis is made from.
///
/// `pods` holds the release's pods and, when the cluster allows listing them, every other
/// scheduled pod (needed to name the pods holding GPUs). Which pods belong to the release is
/// decided by [`Snapshot::is_app_pod`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The namespace diagnosed.
    pub namespace: String,
    /// Helm release name; `None` means every sdkube pod of the namespace.
    pub release: Option<String>,
    /// Pods (see above).
    pub pods: Vec<Pod>,
    /// The namespace's PVCs.
    pub pvcs: Vec<PersistentVolumeClaim>,
    /// Every PersistentVolume.
    pub pvs: Vec<PersistentVolume>,
    /// Every StorageClass.
    pub storage_classes: Vec<StorageClass>,
    /// Every node.
    pub nodes: Vec<Node>,
    /// The namespace's events.
    pub events: Vec<Event>,
    /// The last lines of the release's failing containers.
    pub logs: Vec<ContainerLog>,
    /// Image filesystem space of the nodes pending pods are placed on.
    pub node_stats: Vec<NodeFsStats>,
    /// What could not be read, and why.
    pub not_read: Vec<NotRead>,
    /// The release's Deployments and StatefulSets (read when it runs a shared queue).
    pub deployments: Vec<Deployment>,
    /// The release's StatefulSets (read when it runs a shared queue).
    pub stateful_sets: Vec<StatefulSet>,
    /// KEDA's ScaledObjects in the namespace (read when the release runs a shared queue);
    /// `None` when the API server does not serve them: KEDA is not installed.
    pub scaled_objects: Option<Vec<ScaledObject>>,
    /// `/readyz` of api and worker pods that are not ready, `/metrics` of a ready api pod.
    pub pod_answers: Vec<PodAnswer>,
}

/// An object in a fixture or list that the snapshot does not know how to hold.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An object without `kind`.
    #[error("object has no `kind`")]
    NoKind,
    /// An object of a kind a snapshot does not hold.
    #[error("object of kind {0} is not part of a snapshot")]
    UnexpectedKind(String),
    /// An object that does not parse as its kind.
    #[error("{kind} does not parse: {source}")]
    Parse {
        /// Its kind.
        kind: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
}

impl Snapshot {
    /// An empty snapshot of `namespace` (and `release`).
    pub fn new(namespace: impl Into<String>, release: Option<String>) -> Self {
        Self {
            namespace: namespace.into(),
            release,
            ..Self::default()
        }
    }

    /// The label selector that picks this release's pods.
    pub fn label_selector(&self) -> String {
        match &self.release {
            Some(release) => format!("{NAME_LABEL}={APP_NAME},{INSTANCE_LABEL}={release}"),
            None => format!("{NAME_LABEL}={APP_NAME}"),
        }
    }

    /// Whether `pod` is one of the release's pods (namespace and labels match).
    pub fn is_app_pod(&self, pod: &Pod) -> bool {
        if pod.metadata.namespace.as_deref() != Some(self.namespace.as_str()) {
            return false;
        }
        let labels = pod.metadata.labels.as_ref();
        let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
        label(NAME_LABEL) == Some(APP_NAME)
            && self
                .release
                .as_deref()
                .is_none_or(|release| label(INSTANCE_LABEL) == Some(release))
    }

    /// The release's pods ([`Snapshot::is_app_pod`]).
    pub fn app_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(|p| self.is_app_pod(p))
    }

    /// Events about the object of `kind` named `name` in the snapshot's namespace (or
    /// cluster-scoped), newest last.
    pub fn events_for(&self, kind: &str, name: &str) -> Vec<&Event> {
        let mut events: Vec<&Event> = self
            .events
            .iter()
            .filter(|e| {
                e.involved_object.kind.as_deref() == Some(kind)
                    && e.involved_object.name.as_deref() == Some(name)
            })
            .collect();
        events.sort_by_key(|e| event_time(e));
        events
    }

    /// The release's pods of one component.
    pub fn pods_of(&self, component: Component) -> impl Iterator<Item = &Pod> {
        self.app_pods()
            .filter(move |p| Component::of_pod(p) == component)
    }

    /// Whether the release runs a shared queue (api, worker or Redis pods, or a workload of
    /// theirs).
    pub fn is_scale_out(&self) -> bool {
        self.app_pods()
            .any(|p| Component::of_pod(p) != Component::Server)
            || self
                .workloads()
                .any(|(_, labels, _)| Component::of(labels) != Component::Server)
    }

    /// The release's Deployments and StatefulSets as (kind, labels, object name).
    pub fn workloads(
        &self,
    ) -> impl Iterator<
        Item = (
            &'static str,
            Option<&std::collections::BTreeMap<String, String>>,
            &str,
        ),
    > {
        let deployments = self.deployments.iter().map(|d| {
            (
                "Deployment",
                d.metadata.labels.as_ref(),
                d.metadata.name.as_deref().unwrap_or_default(),
            )
        });
        let stateful_sets = self.stateful_sets.iter().map(|s| {
            (
                "StatefulSet",
                s.metadata.labels.as_ref(),
                s.metadata.name.as_deref().unwrap_or_default(),
            )
        });
        deployments.chain(stateful_sets)
    }

    /// The answer a pod gave on `path`, when it was asked.
    pub fn answer(&self, pod: &str, path: &str) -> Option<&PodAnswer> {
        self.pod_answers
            .iter()
            .find(|a| a.pod == pod && a.path == path)
    }

    /// The log of `container` in `pod`, when it was read.
    pub fn log(&self, pod: &str, container: &str) -> Option<&ContainerLog> {
        self.logs
            .iter()
            .find(|l| l.pod == pod && l.container == container)
    }

    /// Adds one API object given as JSON (as in a `v1 List` from `kubectl get -o json`).
    pub fn insert_object(&mut self, object: serde_json::Value) -> Result<(), SnapshotError> {
        let kind = object
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or(SnapshotError::NoKind)?
            .to_owned();
        fn parse<T: serde::de::DeserializeOwned>(
            kind: &str,
            object: serde_json::Value,
        ) -> Result<T, SnapshotError> {
            serde_json::from_value(object).map_err(|source| SnapshotError::Parse {
                kind: kind.to_owned(),
                source,
            })
        }
        match kind.as_str() {
            "Pod" => self.pods.push(parse(&kind, object)?),
            "PersistentVolumeClaim" => self.pvcs.push(parse(&kind, object)?),
            "PersistentVolume" => self.pvs.push(parse(&kind, object)?),
            "StorageClass" => self.storage_classes.push(parse(&kind, object)?),
            "Node" => self.nodes.push(parse(&kind, object)?),
            "Event" => self.events.push(parse(&kind, object)?),
            "Deployment" => self.deployments.push(parse(&kind, object)?),
            "StatefulSet" => self.stateful_sets.push(parse(&kind, object)?),
            "ScaledObject" => self
                .scaled_objects
                .get_or_insert_with(Vec::new)
                .push(ScaledObject::from_json(&object)),
            _ => return Err(SnapshotError::UnexpectedKind(kind)),
        }
        Ok(())
    }
}

/// When an event last happened (series, lastTimestamp, eventTime, then creation), for ordering.
pub fn event_time(event: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}
