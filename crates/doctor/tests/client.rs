//! The kube-rs client path: `gather` talks HTTP to a loopback server that answers
//! the API paths the way kube-apiserver does (typed `List` objects without per-item kind,
//! label and field selectors, `Status` errors, plain-text logs honouring `tailLines`). The
//! snapshot it gathers must equal the fixture and give the same findings.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kube::{Client, Config};
use sdkube_doctor::cluster::{gather, ClusterError};
use sdkube_doctor::{analyze, FindingCode, Snapshot};
use serde_json::{json, Value};

/// What the fake API server serves, and which resources it refuses (403).
struct Cluster {
    items: Vec<Value>,
    logs: Vec<sdkube_doctor::ContainerLog>,
    stats: Vec<(String, Value)>,
    answers: Vec<sdkube_doctor::PodAnswer>,
    forbidden: BTreeSet<&'static str>,
    /// Resources answered with 404, as by a server that does not serve their API group.
    unserved: BTreeSet<&'static str>,
}

type Shared = Arc<Cluster>;

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    (code, Json(body)).into_response()
}

fn forbidden(resource: &str, scope: &str) -> Response {
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!("{resource} is forbidden: User \"system:serviceaccount:default:viewer\" cannot list resource \"{resource}\" in API group \"\" {scope}"),
    )
}

fn selector_matches(labels: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (key, value) = term.split_once('=').expect("equality selectors only");
        labels.get(key).and_then(Value::as_str) == Some(value)
    })
}

fn field_matches(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (field, value) = term.split_once("!=").expect("only status.phase!= is used");
        assert_eq!(field, "status.phase");
        object["status"]["phase"].as_str() != Some(value)
    })
}

/// A `List` the way the API server sends it: typed kind, items without kind/apiVersion.
fn list(
    cluster: &Cluster,
    kind: &str,
    api_version: &str,
    namespace: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Response {
    let items: Vec<Value> = cluster
        .items
        .iter()
        .filter(|i| i["kind"] == kind)
        .filter(|i| namespace.is_none_or(|ns| i["metadata"]["namespace"] == ns))
        .filter(|i| {
            query
                .get("labelSelector")
                .is_none_or(|s| selector_matches(&i["metadata"]["labels"], s))
        })
        .filter(|i| {
            query
                .get("fieldSelector")
                .is_none_or(|s| field_matches(i, s))
        })
        .map(|i| {
            let mut item = i.clone();
            let map = item.as_object_mut().unwrap();
            map.remove("kind");
            map.remove("apiVersion");
            item
        })
        .collect();
    Json(
        json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": "48213"}, "items": items}),
    )
    .into_response()
}

type Q = Query<BTreeMap<String, String>>;

async fn namespaced(
    State(c): State<Shared>,
    Path((ns, resource)): Path<(String, String)>,
    Query(q): Q,
) -> Response {
    let kind = match resource.as_str() {
        "pods" => "Pod",
        "persistentvolumeclaims" => "PersistentVolumeClaim",
        "events" => "Event",
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource".into(),
            )
        }
    };
    if c.forbidden.contains(resource.as_str()) {
        return forbidden(&resource, &format!("in the namespace \"{ns}\""));
    }
    list(&c, kind, "v1", Some(&ns), &q)
}

async fn cluster_scoped(
    State(c): State<Shared>,
    Path(resource): Path<String>,
    Query(q): Q,
) -> Response {
    let kind = match resource.as_str() {
        "pods" => "Pod",
        "nodes" => "Node",
        "persistentvolumes" => "PersistentVolume",
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource".into(),
            )
        }
    };
    if c.forbidden.contains(resource.as_str()) {
        return forbidden(&resource, "at the cluster scope");
    }
    list(&c, kind, "v1", None, &q)
}

async fn storage_classes(State(c): State<Shared>, Query(q): Q) -> Response {
    if c.unserved.contains("storageclasses") {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    }
    if c.forbidden.contains("storageclasses") {
        return forbidden("storageclasses", "at the cluster scope");
    }
    list(&c, "StorageClass", "storage.k8s.io/v1", None, &q)
}

async fn pod_log(
    State(c): State<Shared>,
    Path((ns, pod)): Path<(String, String)>,
    Query(q): Q,
) -> Response {
    let container = q.get("container").expect("kube names the container");
    let tail: usize = q
        .get("tailLines")
        .expect("kube asks for a tail")
        .parse()
        .unwrap();
    match c.logs.iter().find(|l| l.pod == pod && &l.container == container) {
        Some(log) => {
            let start = log.lines.len().saturating_sub(tail);
            let mut text = log.lines[start..].join("\n");
            text.push('\n');
            (StatusCode::OK, text).into_response()
        }
        None => status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("container \"{container}\" in pod \"{pod}\" is waiting to start: PodInitializing ({ns})"),
        ),
    }
}

/// `/apis/apps/v1/namespaces/{ns}/{deployments,statefulsets}`.
async fn apps(
    State(c): State<Shared>,
    Path((ns, resource)): Path<(String, String)>,
    Query(q): Q,
) -> Response {
    let kind = match resource.as_str() {
        "deployments" => "Deployment",
        "statefulsets" => "StatefulSet",
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource".into(),
            )
        }
    };
    if c.forbidden.contains(resource.as_str()) {
        return forbidden(&resource, &format!("in the namespace \"{ns}\""));
    }
    list(&c, kind, "apps/v1", Some(&ns), &q)
}

/// KEDA's ScaledObjects: served only when the scenario has some (KEDA installed), as a
/// cluster without KEDA's CRDs answers 404.
async fn scaled_objects(State(c): State<Shared>, Path(ns): Path<String>, Query(q): Q) -> Response {
    if !c.items.iter().any(|i| i["kind"] == "ScaledObject") {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    }
    if c.forbidden.contains("scaledobjects") {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("scaledobjects.keda.sh is forbidden: User \"system:serviceaccount:default:viewer\" cannot list resource \"scaledobjects\" in API group \"keda.sh\" in the namespace \"{ns}\""),
        );
    }
    list(&c, "ScaledObject", "keda.sh/v1alpha1", Some(&ns), &q)
}

/// The pod proxy (`pods/{name}:{port}/proxy/{path}`): the pod's own answer, status and body
/// as it gave them; the API server's `Status` when the pod cannot be reached.
async fn pod_proxy(
    State(c): State<Shared>,
    Path((ns, pod_port, path)): Path<(String, String, String)>,
) -> Response {
    let (pod, port) = pod_port.split_once(':').expect("kube names the port");
    assert_eq!(port, "7860");
    if c.forbidden.contains("pods/proxy") {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("pods \"{pod}\" is forbidden: User \"system:serviceaccount:default:viewer\" cannot get resource \"pods/proxy\" in API group \"\" in the namespace \"{ns}\""),
        );
    }
    let path = format!("/{path}");
    match c.answers.iter().find(|a| a.pod == pod && a.path == path) {
        Some(a) => (StatusCode::from_u16(a.status).unwrap(), a.body.clone()).into_response(),
        None => status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            format!("error trying to reach service: dial tcp 10.0.3.9:7860: connect: connection refused ({pod})"),
        ),
    }
}

async fn node_summary(State(c): State<Shared>, Path(node): Path<String>) -> Response {
    match c.stats.iter().find(|(n, _)| *n == node) {
        Some((_, summary)) => Json(summary.clone()).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("nodes \"{node}\" not found"),
        ),
    }
}

async fn serve(cluster: Cluster) -> Client {
    let app = Router::new()
        .route("/api/v1/namespaces/{ns}/{resource}", get(namespaced))
        .route("/api/v1/namespaces/{ns}/pods/{pod}/log", get(pod_log))
        .route(
            "/api/v1/nodes/{node}/proxy/stats/summary",
            get(node_summary),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{pod_port}/proxy/{*path}",
            get(pod_proxy),
        )
        .route("/apis/apps/v1/namespaces/{ns}/{resource}", get(apps))
        .route(
            "/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects",
            get(scaled_objects),
        )
        .route("/api/v1/{resource}", get(cluster_scoped))
        .route(
            "/apis/storage.k8s.io/v1/storageclasses",
            get(storage_classes),
        )
        .with_state(Arc::new(cluster));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut config = Config::new(format!("http://{addr}").parse().unwrap());
    config.default_retry = false; // as `cluster::connect` makes it
    Client::try_from(config).unwrap()
}

fn cluster_for(scenario: &str, forbidden: &[&'static str]) -> Cluster {
    Cluster {
        items: common::fixture_items(scenario),
        logs: common::fixture_logs(scenario),
        stats: common::fixture_stats(scenario),
        answers: common::fixture_answers(scenario),
        forbidden: forbidden.iter().copied().collect(),
        unserved: BTreeSet::new(),
    }
}

/// Lists in a canonical order, so that what came over HTTP compares with the fixture.
fn canonical(mut s: Snapshot) -> Snapshot {
    let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (m.namespace.clone(), m.name.clone())
    };
    s.pods.sort_by_key(|o| key(&o.metadata));
    s.pvcs.sort_by_key(|o| key(&o.metadata));
    s.pvs.sort_by_key(|o| key(&o.metadata));
    s.storage_classes.sort_by_key(|o| key(&o.metadata));
    s.nodes.sort_by_key(|o| key(&o.metadata));
    s.events.sort_by_key(|o| key(&o.metadata));
    s.logs
        .sort_by(|a, b| (&a.pod, &a.container).cmp(&(&b.pod, &b.container)));
    s.deployments.sort_by_key(|o| key(&o.metadata));
    s.stateful_sets.sort_by_key(|o| key(&o.metadata));
    s.pod_answers
        .sort_by(|a, b| (&a.pod, &a.path).cmp(&(&b.pod, &b.path)));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gathered_snapshot_equals_the_fixture_for_every_scenario() {
    for scenario in common::scenarios() {
        let client = serve(cluster_for(&scenario, &[])).await;
        let gathered = gather(&client, common::NAMESPACE, Some(common::RELEASE))
            .await
            .unwrap_or_else(|e| panic!("{scenario}: {e}"));
        let gathered = canonical(gathered);
        let expected = canonical(common::load(&scenario));
        assert_eq!(gathered, expected, "{scenario}");
        assert_eq!(analyze(&gathered), analyze(&expected), "{scenario}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_cluster_scoped_reads_degrade_to_not_checked() {
    let client = serve(cluster_for(
        "gpu-all-allocated",
        &["nodes", "persistentvolumes"],
    ))
    .await;
    let snapshot = gather(&client, common::NAMESPACE, Some(common::RELEASE))
        .await
        .unwrap();
    assert!(snapshot.nodes.is_empty());
    let gaps: Vec<&str> = snapshot.not_read.iter().map(|g| g.what.as_str()).collect();
    assert_eq!(gaps, ["persistentvolumes", "nodes"]);
    assert!(snapshot.not_read[1]
        .reason
        .contains("cannot list resource \"nodes\""));
    let findings = analyze(&snapshot);
    let codes: Vec<FindingCode> = findings.iter().map(|f| f.code).collect();
    // Without nodes the GPU question cannot be settled: the scheduler's message is shown as is.
    assert_eq!(
        codes,
        [
            FindingCode::Unschedulable,
            FindingCode::NotChecked,
            FindingCode::NotChecked
        ]
    );
    assert!(findings[0].evidence[0]
        .message
        .contains("Insufficient nvidia.com/gpu"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_pods_is_an_error_that_says_which_role_to_ask_for() {
    let client = serve(cluster_for("healthy", &["pods"])).await;
    let err = gather(&client, common::NAMESPACE, Some(common::RELEASE))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Forbidden { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("get/list on pods, pods/log, events"),
        "{err}"
    );
    assert_eq!(sdkube_doctor::exit_code(&Err(err)), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_server_is_exit_code_2() {
    // A port that was just free: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut config = Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    config.connect_timeout = Some(std::time::Duration::from_secs(2));
    let client = Client::try_from(config).unwrap();
    let err = gather(&client, "default", None).await.unwrap_err();
    assert!(matches!(err, ClusterError::Unreachable(_)), "{err:?}");
    assert!(err.to_string().contains("kubectl cluster-info"), "{err}");
    assert_eq!(sdkube_doctor::exit_code(&Err(err)), 2);
}

#[test]
fn exit_codes_follow_the_findings() {
    let healthy = analyze(&common::load("healthy"));
    assert_eq!(sdkube_doctor::exit_code(&Ok(healthy)), 0);
    let broken = analyze(&common::load("pvc-no-storage-class"));
    assert_eq!(sdkube_doctor::exit_code(&Ok(broken)), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_api_is_skipped_with_a_sentence() {
    let mut cluster = cluster_for("pvc-class-missing", &[]);
    cluster.unserved.insert("storageclasses");
    let client = serve(cluster).await;
    let snapshot = gather(&client, common::NAMESPACE, Some(common::RELEASE))
        .await
        .unwrap();
    assert!(snapshot.storage_classes.is_empty());
    assert_eq!(snapshot.not_read.len(), 1);
    assert!(
        snapshot.not_read[0]
            .reason
            .contains("does not serve storageclasses"),
        "{:?}",
        snapshot.not_read
    );
    let findings = analyze(&snapshot);
    let missing = findings
        .iter()
        .find(|f| f.code == FindingCode::PvcStorageClassMissing)
        .unwrap();
    assert_eq!(missing.severity, sdkube_doctor::Severity::Warning);
    assert!(
        missing
            .title
            .ends_with("(unverified: StorageClasses could not be read)"),
        "{}",
        missing.title
    );
}

/// A shared queue's release is read further (workloads, KEDA, what the pods answer
/// through the pod proxy); without the rights for those, each gap is said and the rest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_reads_degrade_to_not_checked() {
    let client = serve(cluster_for(
        "scale-out-keda-failing",
        &["deployments", "scaledobjects", "pods/proxy"],
    ))
    .await;
    let snapshot = gather(&client, common::NAMESPACE, Some(common::RELEASE))
        .await
        .unwrap();
    assert!(snapshot.deployments.is_empty() && snapshot.pod_answers.is_empty());
    assert_eq!(snapshot.scaled_objects, None);
    let gaps: Vec<&str> = snapshot.not_read.iter().map(|g| g.what.as_str()).collect();
    assert_eq!(
        gaps,
        [
            "deployments",
            "KEDA ScaledObjects",
            "what the api and worker pods answer (/readyz, /metrics)"
        ]
    );
    assert!(snapshot.not_read[2].reason.contains("pods/proxy"));
    let findings = analyze(&snapshot);
    assert!(
        findings.iter().all(|f| f.code == FindingCode::NotChecked),
        "{findings:#?}"
    );
}
