//! Loading a scenario fixture (see `fixtures/generate.py`) into a [`Snapshot`].

#![allow(dead_code)] // each test binary uses part of this module

use std::path::{Path, PathBuf};

use sdkube_doctor::{ContainerLog, NodeFsStats, PodAnswer, Snapshot};

pub const NAMESPACE: &str = "default";
pub const RELEASE: &str = "sdkube";

pub fn fixture_dir(scenario: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(scenario)
}

/// The `items` of the scenario's `v1 List`, as JSON values.
pub fn fixture_items(scenario: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixture_dir(scenario).join("cluster.yaml"))
        .expect("fixture exists");
    let list: serde_json::Value = serde_yaml::from_str(&text).expect("fixture is YAML");
    assert_eq!(list["kind"], "List", "{scenario}: a fixture is a v1 List");
    list["items"].as_array().expect("items").clone()
}

/// Log tails by (pod, container).
pub fn fixture_logs(scenario: &str) -> Vec<ContainerLog> {
    let mut logs = Vec::new();
    let Ok(pods) = std::fs::read_dir(fixture_dir(scenario).join("logs")) else {
        return logs;
    };
    for pod in pods.flatten() {
        for file in std::fs::read_dir(pod.path()).expect("log dir").flatten() {
            let text = std::fs::read_to_string(file.path()).expect("log file");
            logs.push(ContainerLog {
                pod: pod.file_name().to_string_lossy().into_owned(),
                container: file
                    .path()
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                lines: text.lines().map(str::to_owned).collect(),
            });
        }
    }
    logs
}

/// Kubelet summaries by node name, as the API server returns them through the node proxy.
pub fn fixture_stats(scenario: &str) -> Vec<(String, serde_json::Value)> {
    let Ok(files) = std::fs::read_dir(fixture_dir(scenario).join("stats")) else {
        return Vec::new();
    };
    files
        .flatten()
        .map(|f| {
            let text = std::fs::read_to_string(f.path()).expect("stats file");
            (
                f.path().file_stem().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).expect("stats JSON"),
            )
        })
        .collect()
}

/// What pods answered through the pod proxy (`answers/<pod>.json`).
pub fn fixture_answers(scenario: &str) -> Vec<PodAnswer> {
    let Ok(files) = std::fs::read_dir(fixture_dir(scenario).join("answers")) else {
        return Vec::new();
    };
    let mut answers = Vec::new();
    for file in files.flatten() {
        let pod = file
            .path()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(file.path()).expect("answers file");
        let list: Vec<serde_json::Value> = serde_json::from_str(&text).expect("answers JSON");
        for a in list {
            answers.push(PodAnswer {
                pod: pod.clone(),
                path: a["path"].as_str().unwrap().to_owned(),
                status: a["status"].as_u64().unwrap() as u16,
                body: a["body"].as_str().unwrap().to_owned(),
            });
        }
    }
    answers.sort_by(|a, b| (&a.pod, &a.path).cmp(&(&b.pod, &b.path)));
    answers
}

pub fn load(scenario: &str) -> Snapshot {
    let mut snapshot = Snapshot::new(NAMESPACE, Some(RELEASE.to_owned()));
    for item in fixture_items(scenario) {
        snapshot.insert_object(item).expect("fixture object parses");
    }
    snapshot.logs = fixture_logs(scenario);
    snapshot.pod_answers = fixture_answers(scenario);
    for (node, summary) in fixture_stats(scenario) {
        let fs = &summary["node"]["runtime"]["imageFs"];
        snapshot.node_stats.push(NodeFsStats {
            node,
            image_fs_available_bytes: fs["availableBytes"].as_u64().unwrap(),
            image_fs_capacity_bytes: fs["capacityBytes"].as_u64().unwrap(),
        });
    }
    snapshot
}

/// Every scenario directory.
pub fn scenarios() -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
    names.sort();
    names
}
