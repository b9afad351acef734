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
    NoPods,
    PvcNoStorageClass,
    PvcStorageClassMissing,
    PvcWaitForFirstConsumer,
    PvcNoMatchingVolume,
    PvcProvisioning,
    PvcMissing,
    GpuNotAdvertised,
    GpuAllAllocated,
    NodeSelectorMismatch,
    UntoleratedTaint,
    InsufficientResource,
    Unschedulable,
    ImagePullNetwork,
    ImagePullNotFound,
    ImagePullAuth,
    ImagePullFailed,
    ImageLargerThanFreeSpace,
    InitNetwork,
    InitDiskFull,
    InitChecksum,
    InitUnauthorized,
    InitUnknownModel,
    InitBadSetting,
    InitStoreNotWritable,
    InitFailing,
    NodeDiskPressure,
    NodeMemoryPressure,
    NodePidPressure,
    NodeNotReady,
    PodEvicted,
    CrashLoop,
    OomKilled,
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
    NotChecked,
    LocalGpu,
    LocalCuda,
    LocalStore,
    LocalDisk,
    LocalProxy,
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
    pub advice: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// YAML to put in the chart's values file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<String>,
}

impl Fix {
    pub fn advice(advice: impl Into<String>) -> Self {
        Self {
            advice: advice.into(),
            ..Self::default()
        }
    }

    pub fn command(mut self, command: impl Into<String>) -> Self {
        self.commands.push(command.into());
        self
    }

    pub fn values(mut self, yaml: impl Into<String>) -> Self {
        self.values = Some(yaml.into());
        self
    }
}

/// One problem found, why we believe it, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: FindingCode,
    pub severity: Severity,
    pub title: String,
    pub evidence: Vec<Evidence>,
    pub fix: Fix,
}

impl Finding {
    pub fn new(code: FindingCode, severity: Severity, title: impl Into<String>, fix: Fix) -> Self {
        Self {
            code,
            severity,
            title: title.into(),
            evidence: Vec::new(),
            fix,
        }
    }

    pub fn with_evidence(mut self, evidence: Evidence) -> Self {
        self.evidence.push(evidence);
        self
    }
}

/// True when any finding needs action (warning or error): `doctor` then exits with 1.
pub fn needs_action(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity >= Severity::Warning)
}
