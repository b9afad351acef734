//! What a diagnosis reports: findings with their evidence and fix.

use serde::Serialize;

/// How much a finding matters. Only `Warning` and `Error` make `doctor` exit with 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing, not a fault (e.g. a check that could not run for lack of permission).
    Info,
    /// Likely to cause trouble, or a degraded state.
    Warning,
    /// The deployment cannot run until this is fixed.
    Error,
}

/// A stable identifier per kind of problem, for scripts reading `--output json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingCode {
    /// No sdkube pod in the namespace (or of the release).
    NoPods,
    /// A pending PVC names no StorageClass and the cluster has no default one.
    PvcNoStorageClass,
    /// A pending PVC names a StorageClass that does not exist.
    PvcStorageClassMissing,
    /// A PVC waits for its pod to be scheduled (the class binds on first consumer).
    PvcWaitForFirstConsumer,
    /// A pending PVC: no PersistentVolume of its class fits it.
    PvcNoMatchingVolume,
    /// A pending PVC: the class's provisioner has not created a volume.
    PvcProvisioning,
    /// A pod mounts a PVC that does not exist.
    PvcMissing,
    /// No node advertises `nvidia.com/gpu` (device plugin missing or broken).
    GpuNotAdvertised,
    /// Every GPU is allocated (the finding names the pods holding them).
    GpuAllAllocated,
    /// No node has the labels the pod's node selector asks for.
    NodeSelectorMismatch,
    /// The fitting nodes carry taints the pod does not tolerate.
    UntoleratedTaint,
    /// The pod asks for more CPU or memory than any node has free.
    InsufficientResource,
    /// The pod cannot be scheduled, for another reason the scheduler gave.
    Unschedulable,
    /// A node cannot reach the image registry (a proxy is often the cure).
    ImagePullNetwork,
    /// The image does not exist in its registry.
    ImagePullNotFound,
    /// The registry wants credentials for the image.
    ImagePullAuth,
    /// The image cannot be pulled, for another reason.
    ImagePullFailed,
    /// The image does not fit on the node's image filesystem.
    ImageLargerThanFreeSpace,
    /// The model fetch (init container or server) cannot reach the hub.
    InitNetwork,
    /// The model fetch filled the store's volume.
    InitDiskFull,
    /// The model fetch got a file with the wrong checksum.
    InitChecksum,
    /// The hub refuses the model fetch (401/403).
    InitUnauthorized,
    /// The model fetch is asked for a model the catalog does not have.
    InitUnknownModel,
    /// The model fetch refuses a flag or `SDKUBE_*` value.
    InitBadSetting,
    /// The model fetch cannot write to the store's volume.
    InitStoreNotWritable,
    /// The model fetch keeps failing, for another reason.
    InitFailing,
    /// A node is short of disk (DiskPressure).
    NodeDiskPressure,
    /// A node is short of memory (MemoryPressure).
    NodeMemoryPressure,
    /// A node is running out of process ids (PIDPressure).
    NodePidPressure,
    /// A node is not Ready.
    NodeNotReady,
    /// A pod was evicted from its node.
    PodEvicted,
    /// A container crashes on start (CrashLoopBackOff).
    CrashLoop,
    /// A container was killed for using too much memory.
    OomKilled,
    /// A container runs but its readiness probe fails.
    ReadinessFailing,
    /// A container cannot be created: a Secret or ConfigMap it reads is missing.
    ContainerConfigError,
    /// api or worker pods cannot use the job queue (Redis down, wrong password, host).
    QueueUnreachable,
    /// The api takes jobs, but no GPU worker is ready to run them.
    JobsWaitForWorker,
    /// KEDA's ScaledObject cannot read the queue, is paused, or sees no jobs while some wait.
    KedaNotScaling,
    /// Workers at zero, and KEDA (which would start them) is not installed.
    KedaMissing,
    /// Workers at zero, and nothing scales them up.
    WorkersAtZero,
    /// Part of the cluster could not be read (usually RBAC), so it was not checked.
    NotChecked,
    /// `--local`: whether a GPU device is visible.
    LocalGpu,
    /// `--local`: whether the CUDA libraries load.
    LocalCuda,
    /// `--local`: whether the model store can be written.
    LocalStore,
    /// `--local`: free space on the store's filesystem.
    LocalDisk,
    /// `--local`: the proxy settings in the environment.
    LocalProxy,
    /// `--local`: whether the hub (or mirror) answers.
    LocalHub,
}

/// One fact the finding rests on: an object and what the cluster said about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects).
    pub object: String,
    /// The event or condition reason (`FailedScheduling`, `OOMKilled`…), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The message as Kubernetes wrote it, or a log line.
    pub message: String,
}

impl Evidence {
    /// Evidence about `object`, with the reason Kubernetes gave, if any.
    pub fn new(
        object: impl Into<String>,
        reason: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            object: object.into(),
            reason: reason.map(str::to_owned),
            message: message.into(),
        }
    }
}

/// What to do: a sentence, the commands to type, and/or a Helm values snippet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Fix {
    /// What to do, in a sentence or two.
    pub advice: String,
    /// Commands to type.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// YAML to put in the chart's values file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<String>,
}

impl Fix {
    /// A fix that is only advice.
    pub fn advice(advice: impl Into<String>) -> Self {
        Self {
            advice: advice.into(),
            ..Self::default()
        }
    }

    /// The fix with one more command.
    pub fn command(mut self, command: impl Into<String>) -> Self {
        self.commands.push(command.into());
        self
    }

    /// The fix with a Helm values snippet.
    pub fn values(mut self, yaml: impl Into<String>) -> Self {
        self.values = Some(yaml.into());
        self
    }
}

/// One problem found, why we believe it, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The kind of problem.
    pub code: FindingCode,
    /// How bad it is.
    pub severity: Severity,
    /// The problem in one sentence.
    pub title: String,
    /// The facts it rests on.
    pub evidence: Vec<Evidence>,
    /// How to fix it.
    pub fix: Fix,
}

impl Finding {
    /// A finding without evidence yet.
    pub fn new(code: FindingCode, severity: Severity, title: impl Into<String>, fix: Fix) -> Self {
        Self {
            code,
            severity,
            title: title.into(),
            evidence: Vec::new(),
            fix,
        }
    }

    /// The finding with one more fact.
    pub fn with_evidence(mut self, evidence: Evidence) -> Self {
        self.evidence.push(evidence);
        self
    }
}

/// True when any finding needs action (warning or error): `doctor` then exits with 1.
pub fn needs_action(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity >= Severity::Warning)
}
