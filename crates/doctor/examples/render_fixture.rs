//! Prints the doctor's report for a fixture scenario, as `sdkube doctor` would print it for
//! a cluster in that state: `cargo run -p sdkube-doctor --example render_fixture -- gpu-all-allocated [--json]`.

#[path = "../tests/common/mod.rs"]
mod common;

use sdkube_doctor::analyze;
use sdkube_doctor::report::{render_text, Report};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(scenario) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!(
            "usage: render_fixture <scenario> [--json]; scenarios: {}",
            common::scenarios().join(", ")
        );
        std::process::exit(2);
    };
    let findings = analyze(&common::load(scenario));
    if args.iter().any(|a| a == "--json") {
        println!("{}", Report::new("cluster", &findings).to_json());
    } else {
        let heading = format!(
            "sdkube doctor: namespace {}, release {} (fixture {scenario})",
            common::NAMESPACE,
            common::RELEASE
        );
        print!("{}", render_text(&heading, &findings, false));
    }
}
