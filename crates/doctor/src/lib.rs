//! Diagnosis of a Kubernetes deployment of sdkube and of the local machine.
//!
//! The work is split so that the judgement can be tested without a cluster:
//! [`cluster::gather`] reads the API objects (read-only) into a [`Snapshot`];
//! [`analyze`] is a pure function from that snapshot to [`Finding`]s, each with the
//! evidence it rests on (object, event reason and message) and a concrete fix (a command or
//! a Helm values snippet); [`report`] renders them for a terminal or as JSON.
//! [`local`] checks the machine the command runs on (GPU, CUDA libraries, store, proxy, hub).

pub mod analyze;
pub mod cluster;
pub mod finding;
pub mod local;
pub mod report;
pub mod snapshot;

pub use analyze::analyze;
pub use finding::{Evidence, Finding, FindingCode, Fix, Severity};
pub use snapshot::{Component, ContainerLog, NodeFsStats, PodAnswer, ScaledObject, Snapshot};

/// The process exit code for a cluster diagnosis: 0 healthy, 1 findings that need action,
/// 2 the cluster could not be read.
pub fn exit_code(result: &Result<Vec<Finding>, cluster::ClusterError>) -> u8 {
    match result {
        Ok(findings) if finding::needs_action(findings) => 1,
        Ok(_) => 0,
        Err(_) => EXIT_CLUSTER_UNREADABLE,
    }
}

/// Exit code when the cluster cannot be reached or read.
pub const EXIT_CLUSTER_UNREADABLE: u8 = 2;
