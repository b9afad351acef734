//! A shared queue's release (`queue.backend: redis`): api pods in front, GPU workers behind,
//! Redis between them, KEDA scaling the workers. What can go wrong beyond one pod: the queue
//! unreachable (Redis down, wrong password, wrong host), jobs waiting for a worker that cannot
//! start, workers left at zero with nothing to scale them up. Workers scaled to zero while
//! the queue is empty is how the release rests, and is not reported.

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use super::{event_evidence, helm_upgrade, name, pod_ref};
use crate::finding::{Evidence, Finding, FindingCode, Fix, Severity};
use crate::snapshot::{Component, ScaledObject, Snapshot, COMPONENT_LABEL, MAIN_CONTAINER};

/// Why a pod could not use the job queue, read from its log or its `/readyz` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueFailureKind {
    /// Redis refused the password.
    Auth,
    /// Redis wants a password and none was sent.
    NoPassword,
    /// The Redis host name does not resolve.
    Dns,
    /// `rediss://`: the server's certificate is not trusted.
    Tls,
    /// Refused, timed out, or dropped.
    Unreachable,
}

/// The classified failure and the line that shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFailure {
    /// What went wrong.
    pub kind: QueueFailureKind,
    /// The log line that shows it.
    pub line: String,
}

/// The message of a log line: a JSON line's message and error fields, or the line itself.
fn log_text(line: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(line.trim()) {
        Ok(serde_json::Value::Object(map)) => {
            let fields = map.get("fields");
            let part = |key: &str| {
                fields
                    .and_then(|f| f.get(key))
                    .or_else(|| map.get(key))
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            format!("{} {}", part("message"), part("error"))
                .trim()
                .to_owned()
        }
        _ => line.trim().to_owned(),
    }
}

/// Reads what `sdkube serve` (api or worker role) says when the queue fails: at start
/// (`cannot reach the queue at …`, `creating the job stream in …`) or later (`the job queue is
/// unavailable: …`). The last such line wins.
pub fn classify_queue_log(lines: &[String]) -> Option<QueueFailure> {
    lines.iter().rev().find_map(|line| {
        let text = log_text(line);
        classify_queue_message(&text).map(|kind| QueueFailure { kind, line: text })
    })
}

fn classify_queue_message(text: &str) -> Option<QueueFailureKind> {
    let lower = text.to_lowercase();
    let about_queue = [
        "cannot reach the queue at",
        "creating the job stream in",
        "the job queue is unavailable",
    ]
    .iter()
    .any(|s| lower.contains(s));
    if !about_queue {
        return None;
    }
    let has = |signs: &[&str]| signs.iter().any(|s| lower.contains(s));
    Some(if has(&["noauth", "authentication required"]) {
        QueueFailureKind::NoPassword
    } else if has(&[
        "authenticationfailed",
        "wrongpass",
        "invalid username-password",
        "invalid password",
        "check the password",
    ]) {
        QueueFailureKind::Auth
    } else if has(&[
        "failed to lookup address",
        "name or service not known",
        "nodename nor servname",
        "temporary failure in name resolution",
        "no such host",
        "dns error",
    ]) {
        QueueFailureKind::Dns
    } else if has(&[
        "certificate",
        "ssl_cert_file",
        "tls handshake",
        "unknownissuer",
    ]) {
        QueueFailureKind::Tls
    } else {
        QueueFailureKind::Unreachable
    })
}

/// Why an api or worker pod cannot use the queue, when its log or `/readyz` answer says so.
pub(crate) fn queue_failure(snapshot: &Snapshot, pod: &Pod) -> Option<QueueFailure> {
    // A ready pod uses the queue now, whatever an older line of its log says.
    if !matches!(Component::of_pod(pod), Component::Api | Component::Worker) || is_ready(pod) {
        return None;
    }
    let from_log = snapshot
        .log(name(pod), MAIN_CONTAINER)
        .and_then(|l| classify_queue_log(&l.lines));
    from_log.or_else(|| {
        let answer = snapshot.answer(name(pod), "/readyz")?;
        let message = serde_json::from_str::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| answer.body.clone());
        classify_queue_message(&message).map(|kind| QueueFailure {
            kind,
            line: format!("/readyz answered {}: {message}", answer.status),
        })
    })
}

pub(super) fn check(snapshot: &Snapshot, findings: &mut Vec<Finding>) {
    if !snapshot.is_scale_out() {
        return;
    }
    queue_unreachable(snapshot, findings);
    workers(snapshot, findings);
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

/// Pods that still count: not finished, not evicted.
fn live(pod: &&Pod) -> bool {
    !matches!(phase(pod), "Succeeded" | "Failed")
}

/// A pod's state in a few words, the way `kubectl get pods` would show it.
fn state_of(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    if !scheduled {
        let why = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .and_then(|c| c.message.clone());
        return match why {
            Some(why) => format!("Pending, not scheduled: {why}"),
            None => "Pending, not scheduled".to_owned(),
        };
    }
    let waiting = |statuses: Option<&Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
        statuses.into_iter().flatten().find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.as_deref()?;
            (reason != "PodInitializing").then(|| {
                if c.name == MAIN_CONTAINER || c.name == "redis" {
                    reason.to_owned()
                } else {
                    format!("container {}: {reason}", c.name)
                }
            })
        })
    };
    if let Some(w) = waiting(status.and_then(|s| s.init_container_statuses.as_ref())) {
        return format!("initializing, {w}");
    }
    let init_running = status
        .and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
    if let Some(init) = init_running {
        return format!("initializing: {} is running", init.name);
    }
    if let Some(w) = waiting(status.and_then(|s| s.container_statuses.as_ref())) {
        return w;
    }
    if is_ready(pod) {
        "ready".to_owned()
    } else {
        format!("{}, not ready", phase(pod))
    }
}

/// Whether the pod is stuck rather than on its way: unschedulable, failing, or refused.
fn stuck(pod: &Pod) -> bool {
    let state = state_of(pod);
    state.starts_with("Pending, not scheduled")
        || [
            "CrashLoopBackOff",
            "ImagePullBackOff",
            "ErrImagePull",
            "CreateContainerConfigError",
            "InvalidImageName",
        ]
        .iter()
        .any(|r| state.contains(r))
        || pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.restart_count > 0)
}

fn selector(snapshot: &Snapshot, component: &str) -> String {
    format!(
        "{},{COMPONENT_LABEL}={component}",
        snapshot.label_selector()
    )
}

/// `host:port` from a message quoting the queue URL (`… at redis://***@host:port/0: …`).
fn queue_address(line: &str) -> Option<String> {
    let start = line.find("redis://").or_else(|| line.find("rediss://"))?;
    let rest = &line[start..];
    let rest = &rest[rest.find("://")? + 3..];
    let end = rest
        .find(|c: char| c == '/' || c.is_whitespace())
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, after)| after)
        // `…/0: error` has its ':' after the database; without one it follows the port
        .trim_end_matches(':');
    (!host_port.is_empty()).then(|| host_port.to_owned())
}

fn queue_unreachable(snapshot: &Snapshot, findings: &mut Vec<Finding>) {
    let failing: Vec<(&Pod, QueueFailure)> = snapshot
        .app_pods()
        .filter(live)
        .filter_map(|p| queue_failure(snapshot, p).map(|f| (p, f)))
        .collect();
    let Some((_, first)) = failing.first() else {
        return;
    };
    let kind = first.kind;
    let redis: Vec<&Pod> = snapshot.pods_of(Component::Redis).filter(live).collect();
    let redis_down: Vec<&&Pod> = redis.iter().filter(|p| !is_ready(p)).collect();
    let bundled = !redis.is_empty();
    let who = {
        let api = failing
            .iter()
            .filter(|(p, _)| Component::of_pod(p) == Component::Api)
            .count();
        let workers = failing.len() - api;
        match (api, workers) {
            (0, w) => format!("{w} worker pod(s)"),
            (a, 0) => format!("{a} api pod(s)"),
            (a, w) => format!("{a} api and {w} worker pod(s)"),
        }
    };
    let ns = &snapshot.namespace;
    let address = failing.iter().find_map(|(_, f)| queue_address(&f.line));
    let upgrade = helm_upgrade(snapshot, failing.first().map(|(p, _)| *p));
    let (title, fix) = match kind {
        QueueFailureKind::Auth => (
            format!("Redis refuses the password of {who}: no job can be queued or run"),
            if bundled {
                let sts = redis
                    .first()
                    .and_then(|p| p.metadata.owner_references.as_ref())
                    .and_then(|o| o.first())
                    .map(|o| o.name.clone())
                    .unwrap_or_else(|| "<release>-sdkube-redis".to_owned());
                Fix::advice("The bundled Redis took its password from the Secret when it started; the Secret has changed since (an existing Secret edited, or recreated). Restart Redis so that it reads the current one (queued jobs are kept in its append-only file).")
                    .command(format!("kubectl rollout restart statefulset -n {ns} {sts}"))
            } else {
                Fix::advice("The password in queue.redis.existingSecret (key queue.redis.existingSecretKey) is not the one your Redis expects, or the user in queue.redis.url lacks access. Correct the Secret, then restart the pods.")
                    .values("queue:\n  redis:\n    existingSecret: <Secret holding the password>\n    existingSecretKey: <its key>")
                    .command(upgrade)
            },
        ),
        QueueFailureKind::NoPassword => (
            format!("Redis wants a password and {who} send none"),
            Fix::advice("Put the Redis password in a Secret and name it, so that the pods send it.")
                .command(format!("kubectl create secret generic -n {ns} sdkube-redis --from-literal=redis-password=<password>"))
                .values("queue:\n  redis:\n    existingSecret: sdkube-redis\n    existingSecretKey: redis-password")
                .command(upgrade),
        ),
        QueueFailureKind::Tls => (
            format!("{who} do not trust the Redis server's certificate (rediss://)"),
            Fix::advice("sdkube checks a rediss:// server's certificate against the system's CAs, or the file SSL_CERT_FILE names instead of them. Put your CA together with the public ones (the workers still download models) in one PEM file, mount it with caBundle (the api and the workers get it at /etc/sdkube/ca/) and name it in SSL_CERT_FILE.")
                .values("caBundle:\n  secret: <Secret whose ca.pem holds the public CAs and yours>\nserver:\n  extraEnv:\n    - name: SSL_CERT_FILE\n      value: /etc/sdkube/ca/ca.pem")
                .command(upgrade),
        ),
        QueueFailureKind::Dns | QueueFailureKind::Unreachable => {
            let title = if kind == QueueFailureKind::Dns {
                format!("{who} cannot resolve the Redis host{}", address.as_deref().map(|a| format!(" ({a})")).unwrap_or_default())
            } else {
                format!("{who} cannot reach the job queue (Redis{})", address.as_deref().map(|a| format!(" at {a}")).unwrap_or_default())
            };
            let fix = if !redis_down.is_empty() {
                Fix::advice(format!(
                    "The bundled Redis is not ready{}: fix it first, see its own finding. The api and the workers reconnect by themselves once it is ready; queued jobs are kept.",
                    if kind == QueueFailureKind::Dns {
                        " (its headless Service lists only ready pods, so its name does not even resolve)"
                    } else {
                        ""
                    }
                ))
                    .command(format!("kubectl get pods -n {ns} -l {}", selector(snapshot, "redis")))
                    .command(format!("kubectl describe pod -n {ns} {}", name(redis_down[0])))
            } else if bundled {
                Fix::advice("Redis runs, but the pods do not get through: a NetworkPolicy (the chart's lets the release's api and workers in; one of your own may not), or a DNS problem in the cluster.")
                    .command(format!("kubectl get networkpolicy -n {ns}"))
                    .command(format!("kubectl run -n {ns} redis-check --rm -it --restart=Never --image=docker.io/library/redis:7.2-alpine -- redis-cli -h {} ping", address.as_deref().map(|a| a.split(':').next().unwrap_or(a)).unwrap_or("<redis host>")))
            } else {
                let host = address.as_deref().map(|a| a.rsplit_once(':').map_or(a, |(h, _)| h)).unwrap_or("<redis host>");
                let port = address.as_deref().and_then(|a| a.rsplit_once(':').map(|(_, p)| p)).unwrap_or("6379");
                Fix::advice(if kind == QueueFailureKind::Dns {
                    "The host in queue.redis.url does not resolve from the cluster: correct it (a Service in another namespace is <name>.<namespace>.svc)."
                } else {
                    "Nothing answers at the address in queue.redis.url: check that Redis runs there, and that firewalls and egress NetworkPolicies let the pods through. Test from inside the cluster:"
                })
                .command(format!("kubectl run -n {ns} redis-check --rm -it --restart=Never --image=docker.io/library/redis:7.2-alpine -- redis-cli -h {host} -p {port} ping"))
                .values("queue:\n  redis:\n    url: redis://<host>:<port>/<db>")
                .command(upgrade)
            };
            (title, fix)
        }
    };
    let mut finding = Finding::new(FindingCode::QueueUnreachable, Severity::Error, title, fix);
    for (pod, failure) in &failing {
        finding.evidence.push(Evidence::new(
            format!("{} container {MAIN_CONTAINER}", pod_ref(pod)),
            Some("queue"),
            format!("{}; {}", state_of(pod), failure.line),
        ));
    }
    for pod in redis_down {
        finding
            .evidence
            .push(Evidence::new(pod_ref(pod), Some("redis"), state_of(pod)));
    }
    findings.push(finding);
}

/// Jobs waiting in the whole cluster and live workers, from an api pod's `/metrics`.
fn queue_metrics(snapshot: &Snapshot) -> Option<(String, Option<u64>, Option<u64>)> {
    let answer = snapshot
        .pod_answers
        .iter()
        .find(|a| a.path == "/metrics" && a.status == 200)?;
    let value = |metric: &str| {
        answer.body.lines().find_map(|l| {
            let rest = l.strip_prefix(metric)?.strip_prefix(' ')?;
            rest.trim().parse::<f64>().ok().map(|v| v as u64)
        })
    };
    Some((
        answer.pod.clone(),
        value("sdkube_queue_depth"),
        value("sdkube_workers"),
    ))
}

/// The worker workload: (kind, name, desired replicas).
fn worker_workload(snapshot: &Snapshot) -> Option<(&'static str, String, i32)> {
    let is_worker = |labels| Component::of(labels) == Component::Worker;
    snapshot
        .deployments
        .iter()
        .filter(|d| is_worker(d.metadata.labels.as_ref()))
        .map(|d| {
            (
                "Deployment",
                d.metadata.name.clone().unwrap_or_default(),
                d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            )
        })
        .chain(
            snapshot
                .stateful_sets
                .iter()
                .filter(|s| is_worker(s.metadata.labels.as_ref()))
                .map(|s| {
                    (
                        "StatefulSet",
                        s.metadata.name.clone().unwrap_or_default(),
                        s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                    )
                }),
        )
        .next()
}

fn workers(snapshot: &Snapshot, findings: &mut Vec<Finding>) {
    let api: Vec<&Pod> = snapshot.pods_of(Component::Api).filter(live).collect();
    let Some(api_ready) = api.iter().find(|p| is_ready(p)) else {
        return; // the api's own state is the problem (its findings say why)
    };
    let workers: Vec<&Pod> = snapshot.pods_of(Component::Worker).filter(live).collect();
    if workers.iter().any(|p| is_ready(p)) {
        return;
    }
    let metrics = queue_metrics(snapshot);
    let queued = metrics.as_ref().and_then(|(_, q, _)| *q);
    let queued_text = queued.map(|q| format!(" ({q} queued)")).unwrap_or_default();
    let ns = &snapshot.namespace;
    let mut evidence = vec![Evidence::new(
        pod_ref(api_ready),
        Some("Ready"),
        "the api accepts jobs and keeps them in the queue",
    )];
    if let Some((pod, queued, live_workers)) = &metrics {
        evidence.push(Evidence::new(
            format!("Pod {ns}/{pod} /metrics"),
            None,
            format!(
                "sdkube_queue_depth {}, sdkube_workers {}",
                queued.map_or("?".to_owned(), |q| q.to_string()),
                live_workers.map_or("?".to_owned(), |w| w.to_string())
            ),
        ));
    }
    // Workers exist but none is ready: on their way, or stuck.
    if !workers.is_empty() {
        let blocked = workers.iter().any(|p| stuck(p));
        for pod in &workers {
            evidence.push(Evidence::new(pod_ref(pod), None, state_of(pod)));
        }
        let fix = if blocked {
            Fix::advice("Nothing is lost: the jobs run once a worker is ready. The findings about the worker pods say why they are not (a GPU taken or missing, a node selector, a model download…); fix that.")
        } else {
            Fix::advice("A worker is starting (downloading or loading its model): the jobs run once it is ready.")
                .command(format!("kubectl logs -n {ns} -f {} -c fetch-models", name(workers[0])))
        }
        .command(format!("kubectl get pods -n {ns} -l {} -o wide", selector(snapshot, "worker")))
        .command(format!("kubectl describe pod -n {ns} {}", name(workers[0])));
        let mut finding = Finding::new(
            FindingCode::JobsWaitForWorker,
            if blocked { Severity::Warning } else { Severity::Info },
            format!("Jobs wait for a GPU worker{queued_text}: the api accepts them, but no worker is ready"),
            fix,
        );
        finding.evidence = evidence;
        findings.push(finding);
        return;
    }
    // No worker pod: scaled to zero. Normal while the queue is empty and something will
    // scale the workers up when jobs come.
    let Some((kind, workload, replicas)) = worker_workload(snapshot) else {
        if queued.is_some_and(|q| q > 0) {
            let mut finding = Finding::new(
                FindingCode::JobsWaitForWorker,
                Severity::Warning,
                format!("Jobs wait for a GPU worker{queued_text}, and no worker pod exists"),
                Fix::advice(
                    "Find the release's worker Deployment or StatefulSet and why it has no pods.",
                )
                .command(format!(
                    "kubectl get deploy,statefulset,scaledobject,hpa -n {ns} -l {}",
                    snapshot.label_selector()
                )),
            );
            finding.evidence = evidence;
            findings.push(finding);
        }
        return;
    };
    evidence.push(Evidence::new(
        format!("{kind} {ns}/{workload}"),
        None,
        format!("{replicas} replica(s) wanted, no pod"),
    ));
    let scaler = snapshot.scaled_objects.as_ref().and_then(|all| {
        all.iter()
            .find(|so| so.target_name == workload && so.target_kind == kind)
    });
    match (scaler, &snapshot.scaled_objects) {
        (Some(so), _) => keda(snapshot, so, queued, &queued_text, evidence, findings),
        (None, None) if replicas == 0 => {
            let mut finding = Finding::new(
                FindingCode::KedaMissing,
                if queued.is_some_and(|q| q > 0) { Severity::Error } else { Severity::Warning },
                format!("The workers are scaled to zero and nothing will start one{queued_text}: KEDA is not installed (the cluster does not serve ScaledObjects)"),
                Fix::advice("KEDA scales the workers with the job queue (autoscaling.keda.enabled); it was removed, or never installed. Install it, then upgrade the release to recreate the ScaledObject; or run fixed workers instead.")
                    .command("helm repo add kedacore https://kedacore.github.io/charts && helm repo update")
                    .command("helm install keda kedacore/keda -n keda --create-namespace")
                    .command(helm_upgrade(snapshot, None))
                    .values("# without KEDA:\nautoscaling:\n  keda:\n    enabled: false\nworkload:\n  replicas: 1"),
            );
            finding.evidence = evidence;
            findings.push(finding);
        }
        (None, _) if replicas == 0 => {
            let mut finding = Finding::new(
                FindingCode::WorkersAtZero,
                if queued.is_some_and(|q| q > 0) { Severity::Error } else { Severity::Warning },
                format!("The workers ({kind} {workload}) are scaled to zero and no ScaledObject targets them{queued_text}: queued jobs never run"),
                Fix::advice("Start workers by hand, or let KEDA scale them with the queue.")
                    .command(format!("kubectl scale {} -n {ns} {workload} --replicas=1", kind.to_lowercase()))
                    .values("autoscaling:\n  keda:\n    enabled: true")
                    .command(helm_upgrade(snapshot, None)),
            );
            finding.evidence = evidence;
            findings.push(finding);
        }
        // Replicas wanted but no pod: the workload's own conditions, when read, say why.
        (None, _) => {}
    }
}

/// A ScaledObject targets the workers, which have no pod.
fn keda(
    snapshot: &Snapshot,
    so: &ScaledObject,
    queued: Option<u64>,
    queued_text: &str,
    mut evidence: Vec<Evidence>,
    findings: &mut Vec<Finding>,
) {
    let ns = &snapshot.namespace;
    let object = format!("ScaledObject {ns}/{}", so.name);
    for c in &so.conditions {
        let telling = match c.type_.as_str() {
            "Ready" | "Active" => true,
            "Fallback" | "Paused" => c.status == "True",
            _ => false,
        };
        if telling {
            evidence.push(Evidence::new(
                &object,
                Some(&c.type_),
                format!(
                    "{}{}{}",
                    c.status,
                    c.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                    c.message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    // KEDA says what failed in its events (KEDAScalerFailed: "error establishing redis connection…").
    for event in snapshot
        .events_for("ScaledObject", &so.name)
        .into_iter()
        .rev()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .take(2)
    {
        evidence.push(event_evidence(&object, event));
    }
    let describe = format!("kubectl describe scaledobject -n {ns} {}", so.name);
    let operator_logs = "kubectl logs -n keda deploy/keda-operator --tail=50";
    let status = |t: &str| so.condition(t).map(|c| c.status.as_str());
    if status("Ready") == Some("False") {
        let mut finding = Finding::new(
            FindingCode::KedaNotScaling,
            Severity::Error,
            format!("KEDA cannot read the job queue, so it will not start a worker{queued_text}"),
            Fix::advice("KEDA's operator could not read the stream's length (see its condition below): its address (the Redis Service, in this namespace), the password in the TriggerAuthentication's Secret, or a NetworkPolicy in front of Redis that does not let KEDA's namespace in (autoscaling.keda.operatorNamespace).")
                .command(describe)
                .command(operator_logs)
                .values("autoscaling:\n  keda:\n    operatorNamespace: <namespace of keda-operator>"),
        );
        finding.evidence = evidence;
        findings.push(finding);
    } else if status("Paused") == Some("True") {
        let mut finding = Finding::new(
            FindingCode::KedaNotScaling,
            if queued.is_some_and(|q| q > 0) { Severity::Warning } else { Severity::Info },
            format!("KEDA's scaling of the workers is paused{queued_text}"),
            Fix::advice("The ScaledObject carries KEDA's pause annotation: remove it to let KEDA scale the workers again.")
                .command(format!("kubectl annotate scaledobject -n {ns} {} autoscaling.keda.sh/paused- autoscaling.keda.sh/paused-replicas-", so.name)),
        );
        finding.evidence = evidence;
        findings.push(finding);
    } else if status("Active") != Some("True") && queued.is_some_and(|q| q > 0) {
        let streams: Vec<&str> = so
            .triggers
            .iter()
            .filter_map(|(_, s)| s.as_deref())
            .collect();
        let mut finding = Finding::new(
            FindingCode::KedaNotScaling,
            Severity::Warning,
            format!("Jobs wait{queued_text}, but KEDA sees an empty queue and keeps the workers at zero"),
            Fix::advice(format!(
                "KEDA reads the length of the stream {}; sdkube queues into <queue.prefix>:queue. If they differ (a prefix changed by hand), make them equal; otherwise KEDA has not polled yet (pollingInterval).",
                if streams.is_empty() { "<none>".to_owned() } else { streams.join(", ") }
            ))
            .command(describe)
            .command(operator_logs),
        );
        finding.evidence = evidence;
        findings.push(finding);
    }
}
