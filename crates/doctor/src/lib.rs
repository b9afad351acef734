//! Diagnosis of a Kubernetes deployment and of the local machine.
