//! Everything `analyze` looks at: the API objects read from the cluster and the log tails.

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

/// The last lines a container wrote, as `kubectl logs --tail` gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerLog {
    pub pod: String,
    pub container: String,
    pub lines: Vec<String>,
}

/// Free space of a node's image filesystem, from the kubelet summary API
/// (`/api/v1/nodes/{node}/proxy/stats/summary`, `node.runtime.imageFs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeFsStats {
    pub node: String,
    pub image_fs_available_bytes: u64,
    pub image_fs_capacity_bytes: u64,
}

/// A part of the cluster that could not be read, and why (usually RBAC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotRead {
    pub what: String,
    pub reason: String,
}

/// The objects one diagnosis is made from.
///
/// `pods` holds the release's pods and, when the cluster allows listing them, every other
/// scheduled pod (needed to name the pods holding GPUs). Which pods belong to the release is
/// decided by [`Snapshot::is_app_pod`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub namespace: String,
    /// Helm release name; `None` means every sdkube pod of the namespace.
    pub release: Option<String>,
    pub pods: Vec<Pod>,
    pub pvcs: Vec<PersistentVolumeClaim>,
    pub pvs: Vec<PersistentVolume>,
    pub storage_classes: Vec<StorageClass>,
    pub nodes: Vec<Node>,
    pub events: Vec<Event>,
    pub logs: Vec<ContainerLog>,
    pub node_stats: Vec<NodeFsStats>,
    pub not_read: Vec<NotRead>,
}

/// An object in a fixture or list that the snapshot does not know how to hold.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("object has no `kind`")]
    NoKind,
    #[error("object of kind {0} is not part of a snapshot")]
    UnexpectedKind(String),
    #[error("{kind} does not parse: {source}")]
    Parse {
        kind: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Snapshot {
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
