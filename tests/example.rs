//! The shipped example config and policies load cleanly: what ops copy must work.

use residency_gateway::config::Config;
use residency_gateway::dev::{EMBEDDED_POLICIES, Pki};

#[test]
fn example_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let pki = Pki::new("example CA").unwrap();
    let leaf = pki.issue(&["api.example.com"]).unwrap();
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/gateway.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("certs/gateway.key"), &leaf.key_pem).unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    for entry in std::fs::read_dir(format!("{root}/policies")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join("policies").join(p.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("gateway.toml");
    std::fs::copy(format!("{root}/gateway.toml.example"), &path).unwrap();
    // SAFETY: this binary holds only this file's two tests (the others are in tests/gateway/), and the
    // other one does not touch the environment.
    unsafe {
        std::env::set_var("PARTNER_INTROSPECTION_SECRET", "partner-secret");
        std::env::set_var("RESIDENCY_GATEWAY_ADMIN_TOKEN", "an-admin-token-of-some-length");
    }
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.routes.len(), 2);
    assert_eq!(config.routes[0].jurisdiction.as_str(), "DE", "the alias resolves through cloud-regions.toml");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn embedded_policies_are_the_shipped_ones() {
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped = std::fs::read_dir(format!("{root}/policies")).unwrap().count();
    assert_eq!(shipped, EMBEDDED_POLICIES.len(), "dev embeds every file in policies/");
    for (name, text) in EMBEDDED_POLICIES {
        assert_eq!(&std::fs::read_to_string(format!("{root}/policies/{name}")).unwrap(), text);
    }
}
