//! Reading the cluster with kube-rs: read-only list/get calls that fill a [`Snapshot`].
//!
//! The release's pods must be readable, or there is nothing to diagnose
//! ([`ClusterError`]). Everything else is best effort: a 403 on nodes or volumes is recorded
//! in [`Snapshot::not_read`] with the RBAC rule to ask for, and the diagnosis goes on.

use std::time::Duration;

use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ContainerStatus, Event, Node, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{ApiResource, DynamicObject, ListParams, LogParams};
use kube::{Api, Client, Config};
use serde::de::DeserializeOwned;

use crate::snapshot::{
    Component, ContainerLog, NodeFsStats, NotRead, PodAnswer, ScaledObject, Snapshot,
};

/// How many log lines are read per container.
pub const LOG_TAIL_LINES: i64 = 30;
/// The port sdkube listens on in the chart's pods (named `http`).
const HTTP_PORT: u16 = 7860;
/// Most bytes of a pod's answer kept in the snapshot.
const ANSWER_BYTES: usize = 16 * 1024;
/// How long a pod may take to answer through the proxy (a client with retries on would
/// also retry a 503 for minutes: this bounds it).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the cluster could not be read at all (`doctor` exits with 2).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No kubeconfig and not inside a cluster.
    #[error("no Kubernetes configuration (set KUBECONFIG or create ~/.kube/config, e.g. from /etc/kubernetes/admin.conf, or run inside the cluster)")]
    Config(#[source] kube::config::InferConfigError),
    /// The kubeconfig does not make a client.
    #[error("invalid Kubernetes client configuration")]
    Client(#[source] kube::Error),
    /// The API server does not answer.
    #[error("cannot reach the Kubernetes API server (is the cluster up, and does the kubeconfig point at it? Try `kubectl cluster-info`)")]
    Unreachable(#[source] kube::Error),
    /// The API server refused the credentials.
    #[error("the API server refused the credentials (401): {0}. Refresh the kubeconfig's token or certificate")]
    Unauthorized(String),
    /// RBAC does not allow reading `what`.
    #[error("not allowed to {what} (403): {message}. Ask for a Role granting get/list on pods, pods/log, events and persistentvolumeclaims in the namespace (for a scale-out release also deployments, statefulsets, scaledobjects.keda.sh and get on pods/proxy)")]
    Forbidden {
        /// What was being read.
        what: String,
        /// The API server's message.
        message: String,
    },
    /// Another API error while reading `what`.
    #[error("reading {what}")]
    Api {
        /// What was being read.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// A client from the kubeconfig (or the in-cluster service account), with short timeouts so
/// that an unreachable cluster is reported in seconds, and without kube's retries of 503
/// answers: a pod that is not ready answers `/readyz` with 503, which is what the diagnosis
/// wants to read, not to retry for minutes.
pub async fn connect() -> Result<Client, ClusterError> {
    let mut config = Config::infer().await.map_err(ClusterError::Config)?;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(20));
    config.default_retry = false;
    Client::try_from(config).map_err(ClusterError::Client)
}

/// The namespace the kubeconfig's context names (`default` otherwise).
pub async fn default_namespace() -> Result<String, ClusterError> {
    Config::infer()
        .await
        .map(|c| c.default_namespace)
        .map_err(ClusterError::Config)
}

/// Connects with the kubeconfig and gathers a snapshot, on a private runtime: the blocking
/// entry point for the CLI.
pub fn gather_blocking(
    namespace: Option<&str>,
    release: Option<&str>,
) -> Result<Snapshot, ClusterError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClusterError::Runtime)?;
    runtime.block_on(async {
        let namespace = match namespace {
            Some(ns) => ns.to_owned(),
            None => default_namespace().await?,
        };
        let client = connect().await?;
        gather(&client, &namespace, release).await
    })
}

enum Outcome<T> {
    Read(T),
    Forbidden(String),
}

/// Sorts a failed call: 403 is an answer (returned as its message), the rest are errors.
fn forbidden_or_error(what: &str, err: kube::Error) -> Result<String, ClusterError> {
    match err {
        kube::Error::Api(status) if status.code == 403 => Ok(status.message),
        kube::Error::Api(status) if status.code == 401 => {
            Err(ClusterError::Unauthorized(status.message))
        }
        err @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => {
            Err(ClusterError::Unreachable(err))
        }
        err => Err(ClusterError::Api {
            what: what.to_owned(),
            source: err,
        }),
    }
}

async fn list<T>(
    api: Api<T>,
    params: &ListParams,
    what: &str,
) -> Result<Outcome<Vec<T>>, ClusterError>
where
    T: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.list(params).await {
        Ok(list) => Ok(Outcome::Read(list.items)),
        Err(err) => forbidden_or_error(what, err).map(Outcome::Forbidden),
    }
}

/// Reads, for `namespace` and `release`, the pods (the release's and every scheduled pod,
/// to see who holds the GPUs), PVCs, PVs, StorageClasses, nodes, events, the log tails of
/// failing containers, and the image filesystem of nodes where a pod waits for its image.
pub async fn gather(
    client: &Client,
    namespace: &str,
    release: Option<&str>,
) -> Result<Snapshot, ClusterError> {
    let mut snapshot = Snapshot::new(namespace, release.map(str::to_owned));
    let selector = snapshot.label_selector();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), namespace);

    match list(
        pods_api.clone(),
        &ListParams::default().labels(&selector),
        "pods",
    )
    .await?
    {
        Outcome::Read(pods) => snapshot.pods = pods,
        Outcome::Forbidden(message) => {
            return Err(ClusterError::Forbidden {
                what: format!("list pods in namespace {namespace}"),
                message,
            })
        }
    }
    let scheduled = ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed");
    match list(
        Api::<Pod>::all(client.clone()),
        &scheduled,
        "pods in all namespaces",
    )
    .await?
    {
        Outcome::Read(pods) => merge_pods(&mut snapshot.pods, pods),
        Outcome::Forbidden(message) => {
            snapshot.not_read.push(not_read(
                "pods in all namespaces (to find who holds the GPUs)",
                "pods",
                &message,
            ));
            if let Outcome::Read(pods) = list(pods_api.clone(), &scheduled, "pods").await? {
                merge_pods(&mut snapshot.pods, pods);
            }
        }
    }
    if let Some(pvcs) = optional::<PersistentVolumeClaim>(
        Api::namespaced(client.clone(), namespace),
        "persistentvolumeclaims",
        &mut snapshot,
    )
    .await?
    {
        snapshot.pvcs = pvcs;
    }
    if let Some(pvs) =
        optional::<PersistentVolume>(Api::all(client.clone()), "persistentvolumes", &mut snapshot)
            .await?
    {
        snapshot.pvs = pvs;
    }
    if let Some(classes) =
        optional::<StorageClass>(Api::all(client.clone()), "storageclasses", &mut snapshot).await?
    {
        snapshot.storage_classes = classes;
    }
    if let Some(nodes) = optional::<Node>(Api::all(client.clone()), "nodes", &mut snapshot).await? {
        snapshot.nodes = nodes;
    }
    if let Some(events) = optional::<Event>(
        Api::namespaced(client.clone(), namespace),
        "events",
        &mut snapshot,
    )
    .await?
    {
        snapshot.events = events;
    }
    if snapshot.is_scale_out() {
        read_scale_out(client, namespace, &selector, &mut snapshot).await?;
    }
    read_logs(&pods_api, &mut snapshot).await?;
    read_node_stats(client, &mut snapshot).await?;
    Ok(snapshot)
}

/// A shared queue's release: its Deployments and StatefulSets (is a worker scaled to zero?),
/// KEDA's ScaledObjects (is KEDA there, can it read the queue?), and what the api and worker
/// pods answer on `/readyz` and `/metrics` (why not ready, how many jobs wait).
async fn read_scale_out(
    client: &Client,
    namespace: &str,
    selector: &str,
    snapshot: &mut Snapshot,
) -> Result<(), ClusterError> {
    let release = ListParams::default().labels(selector);
    if let Some(items) = list_if_served::<Deployment>(
        Api::namespaced(client.clone(), namespace),
        &release,
        "deployments",
        snapshot,
    )
    .await?
    {
        snapshot.deployments = items;
    }
    if let Some(items) = list_if_served::<StatefulSet>(
        Api::namespaced(client.clone(), namespace),
        &release,
        "statefulsets",
        snapshot,
    )
    .await?
    {
        snapshot.stateful_sets = items;
    }
    let keda = ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: "ScaledObject".into(),
        plural: "scaledobjects".into(),
    };
    // Every ScaledObject of the namespace: one made by hand may target the workers too.
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &keda);
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            snapshot.scaled_objects = Some(
                list.items
                    .iter()
                    .map(|o| ScaledObject::from_json(&serde_json::to_value(o).unwrap_or_default()))
                    .collect(),
            );
        }
        // Not served: KEDA is not installed, which `analyze` judges.
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(err) => {
            let message = forbidden_or_error("scaledobjects", err)?;
            snapshot.not_read.push(not_read(
                "KEDA ScaledObjects",
                "scaledobjects.keda.sh",
                &message,
            ));
        }
    }
    read_pod_answers(client, namespace, snapshot).await
}

/// A namespaced list, `None` when the API is not served (404, said nothing about) or
/// forbidden (recorded in `not_read`).
async fn list_if_served<T>(
    api: Api<T>,
    params: &ListParams,
    resource: &str,
    snapshot: &mut Snapshot,
) -> Result<Option<Vec<T>>, ClusterError>
where
    T: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.list(params).await {
        Ok(list) => Ok(Some(list.items)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(err) => {
            let message = forbidden_or_error(resource, err)?;
            snapshot
                .not_read
                .push(not_read(resource, resource, &message));
            Ok(None)
        }
    }
}

/// Whether a proxied body is the API server's own `Status` (it could not reach the pod, or
/// refused the request) rather than the pod's answer.
fn api_server_status(body: &str) -> Option<u16> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    (value["kind"] == "Status").then(|| value["code"].as_u64().unwrap_or(0) as u16)
}

async fn read_pod_answers(
    client: &Client,
    namespace: &str,
    snapshot: &mut Snapshot,
) -> Result<(), ClusterError> {
    let mut wanted: Vec<(String, &'static str)> = Vec::new();
    for pod in snapshot.app_pods() {
        let component = Component::of_pod(pod);
        let status = pod.status.as_ref();
        if !matches!(component, Component::Api | Component::Worker)
            || status.and_then(|s| s.phase.as_deref()) != Some("Running")
        {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if !ready {
            wanted.push((name, "/readyz"));
        } else if component == Component::Api && !wanted.iter().any(|(_, p)| *p == "/metrics") {
            // Any api pod reports the whole cluster's queue: one is enough.
            wanted.push((name, "/metrics"));
        }
    }
    for (pod, path) in wanted {
        let uri = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{HTTP_PORT}/proxy{path}");
        let Ok(request) = http::Request::get(uri).body(kube::client::Body::from(Vec::new())) else {
            continue; // a pod name that is not a valid path cannot be asked
        };
        let response = match tokio::time::timeout(ANSWER_TIMEOUT, client.send(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(err @ (kube::Error::HyperError(_) | kube::Error::Service(_)))) => {
                return Err(ClusterError::Unreachable(err))
            }
            Ok(Err(_)) | Err(_) => continue,
        };
        let status = response.status().as_u16();
        let Ok(collected) = response.into_body().collect().await else {
            continue;
        };
        let bytes = collected.to_bytes();
        let body = String::from_utf8_lossy(&bytes[..bytes.len().min(ANSWER_BYTES)]).into_owned();
        match api_server_status(&body) {
            Some(403) => {
                let message = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                snapshot.not_read.push(not_read(
                    "what the api and worker pods answer (/readyz, /metrics)",
                    "pods/proxy",
                    &message,
                ));
                return Ok(());
            }
            Some(_) => continue,
            None => snapshot.pod_answers.push(PodAnswer {
                pod,
                path: path.to_owned(),
                status,
                body,
            }),
        }
    }
    Ok(())
}

fn not_read(what: &str, resource: &str, message: &str) -> NotRead {
    NotRead {
        what: what.to_owned(),
        reason: format!("{message} — grant get/list on {resource} (a ClusterRole for cluster-scoped objects) for a complete diagnosis"),
    }
}

async fn optional<T>(
    api: Api<T>,
    resource: &str,
    snapshot: &mut Snapshot,
) -> Result<Option<Vec<T>>, ClusterError>
where
    T: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(Some(list.items)),
        // An API the server does not serve (old cluster, trimmed API groups): say so, go on.
        Err(kube::Error::Api(status)) if status.code == 404 => {
            snapshot.not_read.push(NotRead {
                what: resource.to_owned(),
                reason: format!(
                    "the API server does not serve {resource} ({}); the checks that need them were skipped — check `kubectl api-resources`",
                    status.message
                ),
            });
            Ok(None)
        }
        Err(err) => {
            let message = forbidden_or_error(resource, err)?;
            snapshot
                .not_read
                .push(not_read(resource, resource, &message));
            Ok(None)
        }
    }
}

fn merge_pods(pods: &mut Vec<Pod>, more: Vec<Pod>) {
    for pod in more {
        let same = |p: &Pod| {
            p.metadata.namespace == pod.metadata.namespace && p.metadata.name == pod.metadata.name
        };
        if !pods.iter().any(same) {
            pods.push(pod);
        }
    }
}

/// Whether a container's log is worth reading: it restarted, ended, or runs unready.
fn worth_reading(status: &ContainerStatus) -> bool {
    let state = status.state.as_ref();
    status.restart_count > 0
        || state
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code != 0)
        || (state.and_then(|s| s.running.as_ref()).is_some()
            && !status.ready
            && status.started == Some(true))
}

async fn read_logs(pods_api: &Api<Pod>, snapshot: &mut Snapshot) -> Result<(), ClusterError> {
    let mut wanted = Vec::new();
    for pod in snapshot.app_pods() {
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        for container in status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
        {
            if worth_reading(container) {
                wanted.push((name.clone(), container.name.clone()));
            }
        }
    }
    for (pod, container) in wanted {
        let params = LogParams {
            container: Some(container.clone()),
            tail_lines: Some(LOG_TAIL_LINES),
            ..LogParams::default()
        };
        match pods_api.logs(&pod, &params).await {
            Ok(text) => snapshot.logs.push(ContainerLog {
                pod,
                container,
                lines: text.lines().map(str::to_owned).collect(),
            }),
            // 400: the container has not started (`waiting to start: PodInitializing`).
            Err(kube::Error::Api(status)) if status.code == 400 || status.code == 404 => {}
            Err(kube::Error::Api(status)) if status.code == 403 => {
                snapshot
                    .not_read
                    .push(not_read("container logs", "pods/log", &status.message));
                return Ok(());
            }
            Err(err) => {
                forbidden_or_error("container logs", err)?;
            }
        }
    }
    Ok(())
}

/// Kubelet summary API, only the part we read.
#[derive(serde::Deserialize)]
struct Summary {
    node: SummaryNode,
}
#[derive(serde::Deserialize)]
struct SummaryNode {
    runtime: Option<SummaryRuntime>,
}
#[derive(serde::Deserialize)]
struct SummaryRuntime {
    #[serde(rename = "imageFs")]
    image_fs: Option<SummaryFs>,
}
#[derive(serde::Deserialize)]
struct SummaryFs {
    #[serde(rename = "availableBytes")]
    available_bytes: Option<u64>,
    #[serde(rename = "capacityBytes")]
    capacity_bytes: Option<u64>,
}

/// Free image filesystem of the nodes where a release pod is scheduled but not yet running
/// (so an image too large for the node can be told).
async fn read_node_stats(client: &Client, snapshot: &mut Snapshot) -> Result<(), ClusterError> {
    let mut nodes: Vec<String> = snapshot
        .app_pods()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending"))
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .collect();
    nodes.sort();
    nodes.dedup();
    for node in nodes {
        let request = match http::Request::get(format!("/api/v1/nodes/{node}/proxy/stats/summary"))
            .body(Vec::new())
        {
            Ok(r) => r,
            Err(_) => continue, // a node name that is not a valid path cannot be asked about
        };
        match client.request::<Summary>(request).await {
            Ok(summary) => {
                if let Some(fs) = summary.node.runtime.and_then(|r| r.image_fs) {
                    if let (Some(available), Some(capacity)) =
                        (fs.available_bytes, fs.capacity_bytes)
                    {
                        snapshot.node_stats.push(NodeFsStats {
                            node,
                            image_fs_available_bytes: available,
                            image_fs_capacity_bytes: capacity,
                        });
                    }
                }
            }
            Err(kube::Error::Api(status)) if status.code == 403 => {
                snapshot.not_read.push(not_read(
                    &format!("node {node}'s disk usage"),
                    "nodes/proxy",
                    &status.message,
                ));
            }
            Err(kube::Error::Api(_)) | Err(kube::Error::SerdeError(_)) => {}
            Err(err) => {
                forbidden_or_error("node stats", err)?;
            }
        }
    }
    Ok(())
}
