//! Arbitrary bytes as a config file: `config::Source::from_text` (TOML syntax), `Config::from_source`
//! (the whole validation, in a directory holding a certificate, a key and the shipped policies, so valid
//! configs get past the file checks), and the same text as a policy file, alone and merged with the
//! shipped ones (`Policy::from_sources`).
//!
//! Config validation only reads files (certificates, keys, policies, secrets); it never writes or
//! connects, so arbitrary paths in the input are harmless.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use residency_gateway::config::{Config, Source};
use residency_gateway::dev::{EMBEDDED_POLICIES, Pki};
use residency_gateway::policy::Policy;

struct Fixture {
    config_path: PathBuf,
    policies: Vec<Source>,
    _dir: std::path::PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rg-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let pki = Pki::new("fuzz CA").unwrap();
        let leaf = pki.issue(&["localhost"]).unwrap();
        for base in [dir.clone(), dir.join("certs")] {
            std::fs::write(base.join("gateway.crt"), format!("{}{}", leaf.cert_pem, pki.ca_pem)).unwrap();
            std::fs::write(base.join("gateway.key"), &leaf.key_pem).unwrap();
            std::fs::write(base.join("ca.pem"), &pki.ca_pem).unwrap();
        }
        for (name, text) in EMBEDDED_POLICIES {
            std::fs::write(dir.join("policies").join(name), text).unwrap();
        }
        // Secrets the example config and the test configs name.
        std::fs::write(dir.join("secret.txt"), "fuzz-secret-0123456789").unwrap();
        // SAFETY: set once, before any other thread of this process reads the environment.
        unsafe {
            std::env::set_var("PARTNER_INTROSPECTION_SECRET", "fuzz-secret-0123456789");
            std::env::set_var("RESIDENCY_GATEWAY_ADMIN_TOKEN", "fuzz-admin-token-0123456789");
        }
        let policies = EMBEDDED_POLICIES
            .iter()
            .map(|(name, text)| Source::from_text(dir.join("policies").join(name), text.to_string()).unwrap())
            .collect();
        Fixture { config_path: dir.join("gateway.toml"), policies, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let text = String::from_utf8_lossy(data).into_owned();
    let Ok(src) = Source::from_text(&f.config_path, text) else {
        return;
    };
    if let Err(errors) = Config::from_source(&src) {
        // Every error renders (file:line: key: message) without panicking.
        let _ = errors.to_string();
    }
    let _ = Policy::from_sources(std::slice::from_ref(&src));
    let mut merged = f.policies.clone();
    merged.push(src);
    let _ = Policy::from_sources(&merged);
});
