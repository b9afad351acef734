//! Rendering: colour only on a terminal without NO_COLOR; JSON carries every field.

mod common;

use sdkube_doctor::analyze;
use sdkube_doctor::report::{render_text, use_colour, Report};

#[test]
fn colour_needs_a_terminal_and_no_no_color() {
    assert!(use_colour(true, None));
    assert!(!use_colour(false, None));
    assert!(!use_colour(true, Some(std::ffi::OsStr::new("1"))));
    assert!(
        use_colour(true, Some(std::ffi::OsStr::new(""))),
        "an empty NO_COLOR does not count"
    );
}

#[test]
fn text_report_shows_evidence_fix_and_verdict() {
    let findings = analyze(&common::load("pvc-no-storage-class"));
    let plain = render_text("sdkube doctor: namespace default", &findings, false);
    assert!(!plain.contains('\x1b'));
    assert!(
        plain.contains("ERROR PVC models-sdkube-0 is Pending"),
        "{plain}"
    );
    assert!(
        plain.contains("FailedBinding: no persistent volumes available"),
        "{plain}"
    );
    assert!(
        plain.contains("$ kubectl delete pvc -n default models-sdkube-0"),
        "{plain}"
    );
    assert!(
        plain.contains("# values.yaml\n        persistence:\n          localVolume:"),
        "{plain}"
    );
    assert!(
        plain.trim_end().ends_with("1 error(s), 0 warning(s)"),
        "{plain}"
    );
    let coloured = render_text("sdkube doctor", &findings, true);
    assert!(coloured.contains("\x1b[1;31mERROR\x1b[0m"), "{coloured}");
    let healthy = render_text("sdkube doctor", &[], false);
    assert!(healthy.contains("healthy: nothing to fix"));
}

#[test]
fn json_report_round_trips_codes_evidence_and_fix() {
    let findings = analyze(&common::load("gpu-all-allocated"));
    let mut report = Report::new("cluster", &findings);
    report.namespace = Some("default");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["healthy"], false);
    assert_eq!(json["namespace"], "default");
    let first = &json["findings"][0];
    assert_eq!(first["code"], "gpu-all-allocated");
    assert_eq!(first["severity"], "error");
    assert_eq!(first["evidence"][0]["reason"], "FailedScheduling");
    assert_eq!(
        first["fix"]["commands"][0],
        "kubectl delete pod -n default cuda-vectoradd"
    );
}
