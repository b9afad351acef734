//! The diagnosis of a shared queue's release: api pods, GPU workers, the
//! bundled Redis, KEDA. Each fixture scenario (`scale-out-*`, written by fixtures/generate.py)
//! and variations of them built here: which finding, on what evidence, with which fix; and
//! the states that are normal (workers scaled to zero while nothing waits) give none.

mod common;

use sdkube_doctor::analyze::{classify_queue_log, QueueFailureKind};
use sdkube_doctor::finding::needs_action;
use sdkube_doctor::{analyze, Finding, FindingCode, Severity, Snapshot};
use serde_json::{json, Value};

fn codes(findings: &[Finding]) -> Vec<FindingCode> {
    findings.iter().map(|f| f.code).collect()
}

fn the(findings: &[Finding], code: FindingCode) -> &Finding {
    findings
        .iter()
        .find(|f| f.code == code)
        .unwrap_or_else(|| panic!("no {code:?} among {:#?}", codes(findings)))
}

fn evidence(f: &Finding) -> String {
    f.evidence
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e.object,
                e.reason.as_deref().unwrap_or(""),
                e.message
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn fix(f: &Finding) -> String {
    format!(
        "{}\n{}\n{}",
        f.fix.advice,
        f.fix.commands.join("\n"),
        f.fix.values.as_deref().unwrap_or("")
    )
}

/// A scenario with its API objects edited before they become a snapshot.
fn load_edited(scenario: &str, edit: impl FnOnce(&mut Vec<Value>)) -> Snapshot {
    let mut items = common::fixture_items(scenario);
    edit(&mut items);
    let mut snapshot = Snapshot::new(common::NAMESPACE, Some(common::RELEASE.to_owned()));
    for item in items {
        snapshot.insert_object(item).expect("object parses");
    }
    snapshot.logs = common::fixture_logs(scenario);
    snapshot.pod_answers = common::fixture_answers(scenario);
    snapshot
}

fn named<'a>(items: &'a mut [Value], name: &str) -> &'a mut Value {
    items
        .iter_mut()
        .find(|i| i["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no object {name}"))
}

const API_POD: &str = "sdkube-api-6f7d9c8b5-k2x4p";
const WORKER_POD: &str = "sdkube-worker-7c8d9e6f5-x7k2m";

#[test]
fn workers_scaled_to_zero_by_keda_with_nothing_queued_is_healthy() {
    let snapshot = common::load("scale-out-idle");
    assert!(snapshot.is_scale_out());
    assert!(
        snapshot
            .pods_of(sdkube_doctor::Component::Worker)
            .next()
            .is_none(),
        "no worker pod at all"
    );
    let findings = analyze(&snapshot);
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn worker_pending_for_a_gpu_says_jobs_wait_beside_the_gpu_explanation() {
    let findings = analyze(&common::load("scale-out-worker-pending-gpu"));
    assert_eq!(
        codes(&findings),
        vec![FindingCode::GpuAllAllocated, FindingCode::JobsWaitForWorker]
    );
    let gpu = &findings[0];
    assert!(gpu.title.contains(WORKER_POD) && gpu.title.contains("default/cuda-vectoradd"));
    let wait = &findings[1];
    assert_eq!(wait.severity, Severity::Warning);
    assert!(wait.title.contains("(3 queued)"), "{}", wait.title);
    let ev = evidence(wait);
    assert!(ev.contains(&format!("Pod default/{API_POD} Ready")), "{ev}");
    assert!(
        ev.contains("sdkube_queue_depth 3, sdkube_workers 0"),
        "{ev}"
    );
    assert!(
        ev.contains(
            "Pending, not scheduled: 0/3 nodes are available: 1 Insufficient nvidia.com/gpu"
        ),
        "{ev}"
    );
    assert!(fix(wait).contains("Nothing is lost"), "{}", fix(wait));
    assert!(fix(wait).contains("app.kubernetes.io/component=worker"));
}

#[test]
fn a_worker_on_its_way_is_information_only() {
    // Scheduled, fetch-models running: it will be ready once the model is there.
    let snapshot = load_edited("scale-out-worker-pending-gpu", |items| {
        items.retain(|i| i["metadata"]["name"] != "cuda-vectoradd");
        items.retain(|i| !(i["kind"] == "Event" && i["involvedObject"]["name"] == WORKER_POD));
        let pod = named(items, WORKER_POD);
        pod["spec"]["nodeName"] = json!("z-k8s-n-1");
        pod["status"] = json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
            "initContainerStatuses": [{"name": "fetch-models", "image": "x", "imageID": "", "ready": false,
                                       "restartCount": 0, "started": true,
                                       "state": {"running": {"startedAt": "2026-11-20T22:31:05Z"}}}],
            "containerStatuses": [{"name": "sdkube", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                                   "state": {"waiting": {"reason": "PodInitializing"}}}]
        });
    });
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::JobsWaitForWorker]);
    assert_eq!(findings[0].severity, Severity::Info);
    assert!(!needs_action(&findings));
    assert!(evidence(&findings[0]).contains("initializing: fetch-models is running"));
    assert!(fix(&findings[0]).contains(&format!(
        "kubectl logs -n default -f {WORKER_POD} -c fetch-models"
    )));
}

#[test]
fn keda_removed_leaves_the_workers_at_zero() {
    let findings = analyze(&common::load("scale-out-keda-missing"));
    assert_eq!(codes(&findings), vec![FindingCode::KedaMissing]);
    let f = &findings[0];
    assert_eq!(f.severity, Severity::Error, "jobs wait");
    assert!(f.title.contains("(2 queued)"));
    assert!(evidence(f).contains("Deployment default/sdkube-worker  0 replica(s) wanted, no pod"));
    let fix = fix(f);
    assert!(fix.contains("helm install keda kedacore/keda"), "{fix}");
    assert!(
        fix.contains("keda:\n    enabled: false\nworkload:\n  replicas: 1"),
        "{fix}"
    );

    // nothing queued yet: still worth a warning (no job would ever start a worker)
    let mut snapshot = common::load("scale-out-keda-missing");
    snapshot.pod_answers.clear();
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::KedaMissing]);
    assert_eq!(findings[0].severity, Severity::Warning);

    // KEDA there, but no ScaledObject targets the workers
    let mut snapshot = common::load("scale-out-keda-missing");
    snapshot.scaled_objects = Some(Vec::new());
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::WorkersAtZero]);
    assert!(findings[0]
        .fix
        .commands
        .contains(&"kubectl scale deployment -n default sdkube-worker --replicas=1".to_owned()));
}

#[test]
fn keda_unable_to_read_the_queue_quotes_its_condition_and_event() {
    let findings = analyze(&common::load("scale-out-keda-failing"));
    assert_eq!(codes(&findings), vec![FindingCode::KedaNotScaling]);
    let f = &findings[0];
    assert_eq!(f.severity, Severity::Error);
    let ev = evidence(f);
    assert!(ev.contains("Ready False (TriggerError): Triggers defined in ScaledObject are not working correctly"), "{ev}");
    assert!(ev.contains("KEDAScalerFailed error establishing redis connection: dial tcp 10.43.12.7:6379: i/o timeout (x40)"), "{ev}");
    assert!(
        !ev.contains("Fallback"),
        "quiet conditions are left out: {ev}"
    );
    assert!(fix(f).contains("operatorNamespace"));
    assert!(fix(f).contains("kubectl logs -n keda deploy/keda-operator"));
}

#[test]
fn keda_seeing_no_jobs_while_some_wait_names_the_stream() {
    let mut snapshot = common::load("scale-out-idle");
    let metrics = &mut snapshot.pod_answers[0];
    metrics.body = metrics
        .body
        .replace("sdkube_queue_depth 0", "sdkube_queue_depth 5");
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::KedaNotScaling]);
    assert_eq!(findings[0].severity, Severity::Warning);
    assert!(
        fix(&findings[0]).contains("sdkube:queue"),
        "{}",
        fix(&findings[0])
    );

    // paused by hand
    let mut snapshot = common::load("scale-out-idle");
    let so = &mut snapshot.scaled_objects.as_mut().unwrap()[0];
    let paused = so
        .conditions
        .iter_mut()
        .find(|c| c.type_ == "Paused")
        .unwrap();
    paused.status = "True".into();
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::KedaNotScaling]);
    assert_eq!(findings[0].severity, Severity::Info, "nothing waits");
    assert!(fix(&findings[0]).contains("autoscaling.keda.sh/paused-"));
}

#[test]
fn redis_claim_unbound_is_fixed_in_redis_values_and_explains_the_api_crash() {
    let findings = analyze(&common::load("scale-out-redis-pvc-pending"));
    assert_eq!(
        codes(&findings),
        vec![
            FindingCode::PvcNoStorageClass,
            FindingCode::QueueUnreachable
        ]
    );
    let claim = &findings[0];
    assert!(claim.title.contains("data-sdkube-redis-0"));
    assert!(claim.title.contains("bundled Redis"), "{}", claim.title);
    let fix_text = fix(claim);
    assert!(
        fix_text
            .contains("queue:\n  redis:\n    bundled:\n      persistence:\n        existingClaim:"),
        "{fix_text}"
    );
    assert!(
        !fix_text.contains("local volume") && !fix_text.contains("localVolume"),
        "{fix_text}"
    );

    let queue = &findings[1];
    assert!(
        queue
            .title
            .contains("2 api pod(s) cannot resolve the Redis host (sdkube-redis.default.svc:6379)"),
        "{}",
        queue.title
    );
    let ev = evidence(queue);
    assert!(
        ev.contains("CrashLoopBackOff; error: cannot reach the queue at redis://***@"),
        "{ev}"
    );
    assert!(
        ev.contains("Pod default/sdkube-redis-0 redis Pending, not scheduled"),
        "{ev}"
    );
    assert!(fix(queue).contains("kubectl describe pod -n default sdkube-redis-0"));
    assert!(
        !findings.iter().any(|f| f.code == FindingCode::CrashLoop),
        "the queue finding explains the crash loops"
    );
}

#[test]
fn a_changed_redis_password_restarts_redis() {
    let findings = analyze(&common::load("scale-out-queue-auth"));
    assert_eq!(codes(&findings), vec![FindingCode::QueueUnreachable]);
    let f = &findings[0];
    assert!(
        f.title
            .starts_with("Redis refuses the password of 2 api pod(s)"),
        "{}",
        f.title
    );
    assert!(f
        .fix
        .commands
        .contains(&"kubectl rollout restart statefulset -n default sdkube-redis".to_owned()));

    // an external Redis (no Redis pod in the release): the Secret is what to correct
    let snapshot = load_edited("scale-out-queue-auth", |items| {
        items.retain(|i| i["metadata"]["name"] != "sdkube-redis-0")
    });
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::QueueUnreachable]);
    assert!(
        fix(&findings[0]).contains("existingSecretKey"),
        "{}",
        fix(&findings[0])
    );
}

#[test]
fn redis_oom_killed_gets_redis_values_and_the_unready_api_is_explained_by_readyz() {
    let findings = analyze(&common::load("scale-out-redis-oom"));
    assert_eq!(
        codes(&findings),
        vec![FindingCode::OomKilled, FindingCode::QueueUnreachable]
    );
    let oom = &findings[0];
    assert!(oom.title.contains("redis") && oom.title.contains("(limit 2Gi)"));
    assert!(
        fix(oom).contains("queue:\n  redis:\n    bundled:\n      maxmemory:"),
        "{}",
        fix(oom)
    );
    let queue = &findings[1];
    assert_eq!(
        queue.title,
        "2 api pod(s) cannot reach the job queue (Redis)"
    );
    assert!(evidence(queue).contains(
        "Running, not ready; /readyz answered 503: the job queue is unavailable: Connection refused (os error 111)"
    ));
    assert!(evidence(queue).contains("sdkube-redis-0 redis CrashLoopBackOff"));
    assert!(
        !findings
            .iter()
            .any(|f| f.code == FindingCode::ReadinessFailing),
        "the queue finding explains the unready api"
    );
}

#[test]
fn external_redis_unreachable_or_unknown_gives_a_test_from_inside_the_cluster() {
    for (line, kind, title) in [
        (
            "error: cannot reach the queue at redis://***@redis.data.svc:6380/2: failed to lookup address information: Name or service not known (is Redis running and reachable from here?)",
            QueueFailureKind::Dns,
            "cannot resolve the Redis host (redis.data.svc:6380)",
        ),
        (
            "error: cannot reach the queue at rediss://***@10.0.0.5:6380/0: Connection refused (os error 111) (is Redis running and reachable from here?)",
            QueueFailureKind::Unreachable,
            "cannot reach the job queue (Redis at 10.0.0.5:6380)",
        ),
    ] {
        assert_eq!(classify_queue_log(&[line.to_owned()]).unwrap().kind, kind);
        let mut snapshot = load_edited("scale-out-queue-auth", |items| {
            items.retain(|i| i["metadata"]["name"] != "sdkube-redis-0")
        });
        for log in &mut snapshot.logs {
            log.lines = vec![line.to_owned()];
        }
        let findings = analyze(&snapshot);
        assert_eq!(codes(&findings), vec![FindingCode::QueueUnreachable]);
        assert!(findings[0].title.contains(title), "{}", findings[0].title);
        let (host, port) = if kind == QueueFailureKind::Dns {
            ("redis.data.svc", "6380")
        } else {
            ("10.0.0.5", "6380")
        };
        assert!(
            fix(&findings[0]).contains(&format!("redis-cli -h {host} -p {port} ping")),
            "{}",
            fix(&findings[0])
        );
    }
}

#[test]
fn queue_log_lines_are_classified() {
    let one = |l: &str| classify_queue_log(&[l.to_owned()]).map(|f| f.kind);
    assert_eq!(
        one(
            r#"error: creating the job stream in redis://sdkube-redis.default.svc:6379/0: "NOAUTH": Authentication required."#
        ),
        Some(QueueFailureKind::NoPassword)
    );
    assert_eq!(
        one("error: cannot reach the queue at rediss://***@redis.example.com:6379/0: invalid peer certificate: UnknownIssuer (rediss:// checks the server's certificate: trust its CA with SSL_CERT_FILE)"),
        Some(QueueFailureKind::Tls)
    );
    // a worker's JSON log line when Redis goes away while it runs
    assert_eq!(
        one(
            r#"{"timestamp":"2026-12-05T10:00:00Z","level":"WARN","fields":{"message":"cannot report to the shared queue","error":"the job queue is unavailable: Connection refused (os error 111)"},"target":"sdkube_server"}"#
        ),
        Some(QueueFailureKind::Unreachable)
    );
    assert_eq!(
        one("error: loading model sd-1.5: CUDA_ERROR_NO_DEVICE"),
        None
    );
    assert_eq!(
        one("connection refused"),
        None,
        "only the queue's own messages count"
    );
}

#[test]
fn a_missing_secret_key_names_the_secret() {
    let snapshot = load_edited("scale-out-idle", |items| {
        let pod = named(items, API_POD);
        pod["status"]["phase"] = json!("Pending");
        pod["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]);
        pod["status"]["containerStatuses"] = json!([{"name": "sdkube", "image": "x", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "CreateContainerConfigError",
            "message": "couldn't find key redis-password in Secret default/redis-cred"}}}]);
    });
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::ContainerConfigError]);
    let f = &findings[0];
    assert!(f
        .title
        .contains("couldn't find key redis-password in Secret default/redis-cred"));
    assert!(f.fix.commands[0].starts_with("kubectl describe secret -n default redis-cred"));
    assert!(f.fix.advice.contains("queue.redis.existingSecretKey"));
}

#[test]
fn fixes_for_redis_and_api_pods_use_their_own_values() {
    // Redis cannot be scheduled for memory: its resources are queue.redis.bundled.resources
    let snapshot = load_edited("scale-out-idle", |items| {
        let pod = named(items, "sdkube-redis-0");
        pod["spec"].as_object_mut().unwrap().remove("nodeName");
        pod["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient memory."}]});
    });
    let findings = analyze(&snapshot);
    let f = the(&findings, FindingCode::InsufficientResource);
    assert_eq!(
        f.fix.values.as_deref(),
        Some("queue:\n  redis:\n    bundled:\n      resources:\n        requests:\n          memory: <smaller>")
    );
    // the api does not tolerate a taint on every node: api.tolerations
    let snapshot = load_edited("scale-out-idle", |items| {
        for node in items.iter_mut().filter(|i| i["kind"] == "Node") {
            node["spec"]["taints"] =
                json!([{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]);
        }
        let pod = named(items, API_POD);
        pod["spec"].as_object_mut().unwrap().remove("nodeName");
        pod["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes are available: 3 node(s) had untolerated taint {dedicated: ml}."}]});
    });
    let findings = analyze(&snapshot);
    let f = the(&findings, FindingCode::UntoleratedTaint);
    let values = f.fix.values.as_deref().unwrap();
    assert!(
        values.starts_with("api:\n  tolerations:\n    - key: dedicated"),
        "{values}"
    );
}

#[test]
fn models_claim_waiting_for_workers_scaled_to_zero_is_information() {
    let snapshot = load_edited("scale-out-idle", |items| {
        let claim = named(items, "sdkube-data");
        claim["status"] = json!({"phase": "Pending"});
        claim["spec"]["storageClassName"] = json!("local-path");
        claim["spec"].as_object_mut().unwrap().remove("volumeName");
    });
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::PvcWaitForFirstConsumer]);
    assert_eq!(findings[0].severity, Severity::Info);
    assert!(findings[0].title.contains("scaled to zero"));
}

#[test]
fn without_pod_proxy_rights_the_idle_release_is_still_healthy() {
    let mut snapshot = common::load("scale-out-idle");
    snapshot.pod_answers.clear();
    assert!(!needs_action(&analyze(&snapshot)));
    // and the memory-mode scenarios never look for any of this
    assert!(!common::load("healthy").is_scale_out());
}
