//! The diagnosis of each fixture scenario: which problem is found, on what
//! evidence, and which fix is proposed.

mod common;

use sdkube_doctor::finding::needs_action;
use sdkube_doctor::{analyze, Finding, FindingCode, Severity};

fn diagnose(scenario: &str) -> Vec<Finding> {
    analyze(&common::load(scenario))
}

fn the(findings: &[Finding], code: FindingCode) -> &Finding {
    findings
        .iter()
        .find(|f| f.code == code)
        .unwrap_or_else(|| panic!("no {code:?} among {:#?}", codes(findings)))
}

fn codes(findings: &[Finding]) -> Vec<FindingCode> {
    findings.iter().map(|f| f.code).collect()
}

fn evidence_text(finding: &Finding) -> String {
    finding
        .evidence
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

fn fix_text(finding: &Finding) -> String {
    format!(
        "{}\n{}\n{}",
        finding.fix.advice,
        finding.fix.commands.join("\n"),
        finding.fix.values.as_deref().unwrap_or("")
    )
}

#[test]
fn seed_pvc_without_class_and_no_default_class_asks_for_a_local_volume() {
    let findings = diagnose("pvc-no-storage-class");
    assert_eq!(codes(&findings), vec![FindingCode::PvcNoStorageClass]);
    let f = &findings[0];
    assert_eq!(f.severity, Severity::Error);
    assert!(f.title.contains("models-sdkube-0"), "{}", f.title);
    let evidence = evidence_text(f);
    assert!(evidence.contains("FailedBinding no persistent volumes available for this claim and no storage class is set (x3262)"), "{evidence}");
    assert!(evidence.contains("Pod default/sdkube-0 FailedScheduling 0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims"), "{evidence}");
    let fix = fix_text(f);
    assert!(fix.contains("localVolume:\n    enabled: true"), "{fix}");
    assert!(
        fix.contains("nodeName: z-k8s-n-1"),
        "the GPU node is proposed: {fix}"
    );
    assert!(
        fix.contains("kubectl delete pvc -n default models-sdkube-0"),
        "{fix}"
    );
}

#[test]
fn missing_storage_class_names_the_classes_that_exist() {
    let findings = diagnose("pvc-class-missing");
    assert_eq!(codes(&findings), vec![FindingCode::PvcStorageClassMissing]);
    let f = &findings[0];
    assert!(f.title.contains("fast-ssd"), "{}", f.title);
    assert!(evidence_text(f)
        .contains("ProvisioningFailed storageclass.storage.k8s.io \"fast-ssd\" not found"));
    assert!(
        fix_text(f).contains("storageClass: local-path"),
        "{}",
        fix_text(f)
    );
}

#[test]
fn static_class_says_why_each_volume_does_not_fit() {
    let findings = diagnose("pvc-no-matching-volume");
    assert_eq!(codes(&findings), vec![FindingCode::PvcNoMatchingVolume]);
    let evidence = evidence_text(&findings[0]);
    assert!(evidence.contains("PersistentVolume sdkube-pv  its capacity 8.0 GiB is smaller than the 20.0 GiB requested"), "{evidence}");
    assert!(
        evidence.contains(
            "PersistentVolume old-sd-pv  it is Released by default/stable-diffusion-1673539037"
        ),
        "{evidence}"
    );
}

#[test]
fn seed_gpu_held_by_the_operator_sample_pod_is_named_with_the_command_to_delete_it() {
    let findings = diagnose("gpu-all-allocated");
    // The selector and control-plane taint reasons in the message concern other nodes.
    assert_eq!(codes(&findings), vec![FindingCode::GpuAllAllocated]);
    let f = &findings[0];
    assert!(f.title.contains("default/cuda-vectoradd"), "{}", f.title);
    assert!(
        evidence_text(f)
            .contains("Node z-k8s-n-1  1 of 1 GPU(s) allocated to default/cuda-vectoradd (1)"),
        "{}",
        evidence_text(f)
    );
    assert!(
        f.fix
            .commands
            .contains(&"kubectl delete pod -n default cuda-vectoradd".to_owned()),
        "{:?}",
        f.fix.commands
    );
}

#[test]
fn no_node_advertising_gpus_points_at_the_device_plugin_and_the_claim_just_waits() {
    let findings = diagnose("gpu-not-advertised");
    assert_eq!(
        codes(&findings),
        vec![
            FindingCode::GpuNotAdvertised,
            FindingCode::PvcWaitForFirstConsumer
        ]
    );
    assert!(fix_text(&findings[0]).contains("gpu-operator"));
    assert_eq!(findings[1].severity, Severity::Info);
    assert!(evidence_text(&findings[1])
        .contains("waiting for first consumer to be created before binding"));
}

#[test]
fn selector_matching_no_node_suggests_labelling_the_gpu_node() {
    let findings = diagnose("node-selector-mismatch");
    assert_eq!(codes(&findings), vec![FindingCode::NodeSelectorMismatch]);
    let f = &findings[0];
    assert!(
        f.title.contains("nvidia.com/gpu.present=true"),
        "{}",
        f.title
    );
    assert!(evidence_text(f).contains("Node z-k8s-n-1  has 1 nvidia.com/gpu but lacks the label"));
    assert!(f
        .fix
        .commands
        .contains(&"kubectl label node z-k8s-n-1 nvidia.com/gpu.present=true".to_owned()));
    assert!(fix_text(f).contains("nodeSelector: {}"));
}

#[test]
fn untolerated_gpu_taint_gives_the_toleration_snippet() {
    let findings = diagnose("untolerated-taint");
    assert_eq!(codes(&findings), vec![FindingCode::UntoleratedTaint]);
    let f = &findings[0];
    assert!(
        f.title
            .contains("z-k8s-n-1 (nvidia.com/gpu=present:NoSchedule)"),
        "{}",
        f.title
    );
    let values = f.fix.values.as_deref().unwrap();
    assert!(values.contains("- key: nvidia.com/gpu\n    operator: Equal\n    value: \"present\"\n    effect: NoSchedule"), "{values}");
    assert!(f
        .fix
        .commands
        .contains(&"kubectl taint node z-k8s-n-1 nvidia.com/gpu=present:NoSchedule-".to_owned()));
}

#[test]
fn seed_image_pull_timeouts_point_at_containerd_proxy() {
    for scenario in ["image-pull-timeout", "image-pull-tls-timeout"] {
        let findings = diagnose(scenario);
        assert_eq!(
            codes(&findings),
            vec![FindingCode::ImagePullNetwork],
            "{scenario}"
        );
        let f = &findings[0];
        assert!(f.title.contains("registry ghcr.io"), "{}", f.title);
        let fix = fix_text(f);
        assert!(
            fix.contains("/etc/systemd/system/containerd.service.d/http-proxy.conf"),
            "{fix}"
        );
        assert!(fix.contains("systemctl restart containerd"), "{fix}");
    }
    let tls = diagnose("image-pull-tls-timeout");
    assert!(evidence_text(&tls[0]).contains("net/http: TLS handshake timeout (x7)"));
}

#[test]
fn seed_image_larger_than_free_image_filesystem() {
    let findings = diagnose("image-larger-than-disk");
    assert_eq!(
        codes(&findings),
        vec![FindingCode::ImageLargerThanFreeSpace]
    );
    let f = &findings[0];
    assert!(
        f.title.contains(
            "(7.6 GiB) is larger than the free image filesystem on node z-k8s-n-1 (1.6 GiB)"
        ),
        "{}",
        f.title
    );
    assert!(fix_text(f).contains("crictl rmi --prune"));
}

#[test]
fn init_container_failures_are_classified_from_their_last_lines() {
    let cases = [
        ("init-network", FindingCode::InitNetwork, "proxy:\n  http:"),
        (
            "init-disk-full",
            FindingCode::InitDiskFull,
            "persistence:\n  size:",
        ),
        (
            "init-checksum",
            FindingCode::InitChecksum,
            "kubectl delete pod -n default sdkube-0",
        ),
        (
            "init-unauthorized",
            FindingCode::InitUnauthorized,
            "existingSecret: hf-token",
        ),
    ];
    for (scenario, code, fix) in cases {
        let findings = diagnose(scenario);
        assert_eq!(codes(&findings), vec![code], "{scenario}");
        let f = &findings[0];
        let evidence = evidence_text(f);
        assert!(
            evidence.contains(
                "container fetch-models CrashLoopBackOff restarted 36 times, last exit code 1"
            ),
            "{evidence}"
        );
        assert!(
            evidence.contains("\"event\": \"error\""),
            "the raw last lines are quoted: {evidence}"
        );
        assert!(fix_text(f).contains(fix), "{scenario}: {}", fix_text(f));
    }
}

#[test]
fn node_pressure_eviction_and_condition_taint() {
    let findings = diagnose("node-pressure");
    let got = codes(&findings);
    assert!(got.contains(&FindingCode::NodeDiskPressure), "{got:?}");
    assert!(got.contains(&FindingCode::NodeMemoryPressure), "{got:?}");
    assert!(got.contains(&FindingCode::PodEvicted), "{got:?}");
    assert!(got.contains(&FindingCode::UntoleratedTaint), "{got:?}");
    assert!(
        !got.contains(&FindingCode::GpuAllAllocated),
        "the GPU is free, only tainted: {got:?}"
    );
    let disk = the(&findings, FindingCode::NodeDiskPressure);
    assert_eq!(disk.severity, Severity::Error, "the GPU node matters");
    assert!(evidence_text(disk).contains("KubeletHasDiskPressure kubelet has disk pressure"));
    assert_eq!(
        the(&findings, FindingCode::NodeMemoryPressure).severity,
        Severity::Warning
    );
    let taint = the(&findings, FindingCode::UntoleratedTaint);
    assert!(
        taint.fix.values.is_none(),
        "a condition taint is never tolerated away"
    );
    let evicted = the(&findings, FindingCode::PodEvicted);
    assert!(evidence_text(evicted).contains("The node was low on resource: ephemeral-storage"));
}

#[test]
fn crash_loop_quotes_the_last_log_lines() {
    let findings = diagnose("crashloop");
    assert_eq!(codes(&findings), vec![FindingCode::CrashLoop]);
    let evidence = evidence_text(&findings[0]);
    assert!(evidence.contains("CUDA_ERROR_NO_DEVICE"), "{evidence}");
    assert!(
        evidence.contains("restarted 5 times, last exit code 2"),
        "{evidence}"
    );
}

#[test]
fn oom_kill_shows_the_limit_and_raises_it() {
    let findings = diagnose("oomkilled");
    assert_eq!(codes(&findings), vec![FindingCode::OomKilled]);
    assert!(
        findings[0].title.contains("(limit 6Gi)"),
        "{}",
        findings[0].title
    );
    assert!(fix_text(&findings[0]).contains("memory: 24Gi"));
}

#[test]
fn failing_readiness_with_503_reads_the_server_log() {
    let findings = diagnose("readiness-failing");
    assert_eq!(codes(&findings), vec![FindingCode::ReadinessFailing]);
    let f = &findings[0];
    assert!(evidence_text(f).contains(
        "Unhealthy Readiness probe failed: HTTP probe failed with statuscode: 503 (x412)"
    ));
    assert!(evidence_text(f).contains("missing from the store"));
    assert!(f.fix.advice.contains("/readyz"));
}

#[test]
fn healthy_release_has_no_findings() {
    let findings = diagnose("healthy");
    assert!(findings.is_empty(), "{findings:#?}");
    assert!(!needs_action(&findings));
}

#[test]
fn every_problem_scenario_needs_action_and_every_finding_has_evidence_and_a_fix() {
    for scenario in common::scenarios() {
        let findings = diagnose(&scenario);
        // healthy: one server; scale-out-idle: workers scaled to zero with nothing queued
        if scenario == "healthy" || scenario == "scale-out-idle" {
            continue;
        }
        assert!(needs_action(&findings), "{scenario}: {findings:#?}");
        for f in &findings {
            assert!(
                !f.evidence.is_empty(),
                "{scenario}: {} has no evidence",
                f.title
            );
            assert!(
                !f.fix.advice.is_empty(),
                "{scenario}: {} has no fix",
                f.title
            );
        }
    }
}

#[test]
fn wrong_release_finds_no_pods() {
    let mut snapshot = common::load("healthy");
    snapshot.release = Some("other".into());
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::NoPods]);
    assert!(fix_text(&findings[0]).contains("helm list -n default"));
}

#[test]
fn scheduling_condition_stands_in_for_expired_events() {
    // Events expire after an hour; the PodScheduled condition keeps the scheduler's message.
    let mut snapshot = common::load("gpu-all-allocated");
    snapshot.events.clear();
    let findings = analyze(&snapshot);
    assert_eq!(codes(&findings), vec![FindingCode::GpuAllAllocated]);
    assert_eq!(
        findings[0].evidence[0].reason.as_deref(),
        Some("Unschedulable")
    );
}

#[test]
fn fetch_log_classification_reads_json_errors_and_plain_lines() {
    use sdkube_doctor::analyze::{classify_fetch_log, FetchFailureKind};
    let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let json = lines(&[
        r#"{"event":"progress","file":"a","done":1,"total":2}"#,
        r#"{"event":"error","message":"tcp connect error: Connection refused (os error 111)"}"#,
    ]);
    assert_eq!(
        classify_fetch_log(&json).unwrap().kind,
        FetchFailureKind::Network
    );
    // A progress line mentioning an error-like word is not an error.
    let quiet = lines(&[r#"{"event":"file","file":"error-model.safetensors"}"#]);
    assert_eq!(classify_fetch_log(&quiet), None);
    let plain = lines(&[
        "Error: HTTP status client error (401 Unauthorized) for url (https://huggingface.co/x)",
    ]);
    assert_eq!(
        classify_fetch_log(&plain).unwrap().kind,
        FetchFailureKind::Unauthorized
    );
    // A known cause earlier in the tail wins over a generic last line.
    let mixed = lines(&[
        "write failed: No space left on device (os error 28)",
        "error: fetch failed",
    ]);
    assert_eq!(
        classify_fetch_log(&mixed).unwrap().kind,
        FetchFailureKind::DiskFull
    );
    let other = lines(&["thread 'main' panicked at src/main.rs:3:5"]);
    assert_eq!(
        classify_fetch_log(&other).unwrap().kind,
        FetchFailureKind::Other
    );
}

/// What `sdkube fetch` prints (the lines below come from the image, run by
/// tests/python/test_chart_pod.py) when it is given a model the catalog lacks, a setting it
/// refuses, or a volume it may not write: each is named, with its own fix.
#[test]
fn init_container_refusals_at_start_are_recognised() {
    let cases: [(&[&str], FindingCode, &str, &str); 4] = [
        (
            &[r#"{"event":"error","exit_code":2,"message":"unknown model \"sd-9\"; the catalog has: sd-1.5, sdxl-base"}"#],
            FindingCode::InitUnknownModel,
            "models:\n  - sd-1.5",
            "unknown model \"sd-9\"",
        ),
        (
            &[
                "error: invalid value '0' for '--connections <CONNECTIONS>': 0 is not in 1..=64",
                "",
                "For more information, try '--help'.",
                "note: --connections was not given on the command line: its value comes from the environment variable SDKUBE_FETCH_CONNECTIONS=\"0\"",
            ],
            FindingCode::InitBadSetting,
            "helm upgrade",
            "environment variable SDKUBE_FETCH_CONNECTIONS=\"0\"",
        ),
        (
            &[r#"{"event":"error","exit_code":2,"message":"cannot create store directory /data/models: Permission denied (os error 13): /data belongs to uid 0 gid 0 (mode 755) and sdkube runs as uid 10001; make the volume writable for that user"}"#],
            FindingCode::InitStoreNotWritable,
            "sudo chown -R 1000:1000 /var/lib/sdkube/models   # on node z-k8s-n-1",
            "Permission denied (os error 13)",
        ),
        (
            &["error: cannot create store directory /data/models: Read-only file system (os error 30)"],
            FindingCode::InitStoreNotWritable,
            "never applies fsGroup to hostPath",
            "Read-only file system",
        ),
    ];
    for (lines, code, fix, cause) in cases {
        let mut snapshot = common::load("init-network");
        let log = snapshot
            .logs
            .iter_mut()
            .find(|l| l.container == "fetch-models")
            .expect("the fixture has the init container's log");
        log.lines = lines.iter().map(|l| l.to_string()).collect();
        let findings = analyze(&snapshot);
        assert_eq!(codes(&findings), vec![code], "{lines:?}");
        let f = &findings[0];
        assert_eq!(f.severity, Severity::Error);
        assert!(fix_text(f).contains(fix), "{code:?}: {}", fix_text(f));
        let classified = f
            .evidence
            .iter()
            .find(|e| e.reason.as_deref() == Some("classified"))
            .expect("the line that shows the cause is quoted");
        assert!(classified.message.contains(cause), "{}", classified.message);
    }
}
