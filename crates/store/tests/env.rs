//! `FetchOptions::from_env`, in a test binary of its own: it changes the process environment.

use std::path::PathBuf;

use sdkube_store::FetchOptions;

#[test]
fn from_env_reads_the_ca_bundle_endpoint_token_and_proxies() {
    std::env::set_var("SDKUBE_CA_BUNDLE", "/etc/sdkube/ca.pem");
    std::env::set_var("HF_ENDPOINT", "https://mirror.example");
    std::env::set_var("HF_TOKEN", " ");
    std::env::set_var("HUGGING_FACE_HUB_TOKEN", "hf_x");
    std::env::set_var("https_proxy", "http://proxy.example:3128");
    let options = FetchOptions::from_env();
    assert_eq!(options.ca_bundle, Some(PathBuf::from("/etc/sdkube/ca.pem")));
    assert_eq!(options.hf_endpoint, "https://mirror.example");
    assert_eq!(
        options.hf_token.as_deref(),
        Some("hf_x"),
        "blank HF_TOKEN is unset"
    );
    assert_eq!(
        options.proxy.https.as_deref(),
        Some("http://proxy.example:3128")
    );

    std::env::set_var("SDKUBE_CA_BUNDLE", "");
    assert_eq!(FetchOptions::from_env().ca_bundle, None, "empty is unset");
}
