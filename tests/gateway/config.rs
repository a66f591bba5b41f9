//! Config validation: every problem in one pass, each naming file, line and key; and `check` on the
//! command line.

use std::path::{Path, PathBuf};
use std::process::Command;

use residency_gateway::config::Config;
use residency_gateway::dev::Pki;

use crate::support;

/// Every mistake the test expects, each on a line holding a unique marker comment.
const BAD: &str = r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
listen_port = 8443 # @unknown-key

[server.tls]
cert = "missing/gateway.crt" # @cert
key = "gateway.key"
cipher_suites = ["TLS13_AES_256_GCM_SHA384", "TLS_RSA_WITH_RC4_128_SHA"] # @suite

[[issuers]]
name = "corp"
issuer = "https://idp.example/"
audiences = ["api"]
jwks_uri = "https://idp.example/jwks.json"
algorithms = ["RS256", "HS256"] # @hs256

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "http://127.0.0.1:9001"
jurisdiction = "DE"
issuers = ["nobody"] # @unknown-issuer

[[routes]]
name = "orders" # @duplicate-name
path_prefix = "/billing"
upstream = "http://127.0.0.1:9002"
jurisdiction = "DE"
issuers = ["corp"]

[[routes]]
name = "orders-again"
path_prefix = "/orders" # @duplicate-prefix
upstream = "http://127.0.0.1:9003"
jurisdiction = "DE"
issuers = ["corp"]

[[routes]]
name = "nowhere"
path_prefix = "/nowhere"
upstream = "http://127.0.0.1:9004"
jurisdiction = "XX" # @jurisdiction
issuers = ["corp"]
"#;

/// (marker, key) for every error `BAD` must produce.
const EXPECTED: &[(&str, &str)] = &[
    ("@unknown-key", "server.listen_port"),
    ("@cert", "server.tls.cert"),
    ("@suite", "server.tls.cipher_suites"),
    ("@hs256", "issuers[0].algorithms[1]"),
    ("@unknown-issuer", "routes[0].issuers[0]"),
    ("@duplicate-name", "routes[1].name"),
    ("@duplicate-prefix", "routes[2].path_prefix"),
    ("@jurisdiction", "routes[3].jurisdiction"),
];

/// The 1-based line holding `marker`, which must occur exactly once.
fn line_of(text: &str, marker: &str) -> usize {
    let lines: Vec<usize> =
        text.lines().enumerate().filter(|(_, l)| l.contains(marker)).map(|(i, _)| i + 1).collect();
    assert_eq!(lines.len(), 1, "marker {marker}");
    lines[0]
}

/// A directory with certificate, key and policies, and `text` as gateway.toml.
fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let pki = Pki::new("config test CA").unwrap();
    let dir = support::prepare_dir(&pki);
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn load_errors(path: &Path) -> Vec<String> {
    match Config::load(path) {
        Ok(_) => panic!("the config loaded although it is wrong"),
        Err(errors) => errors.0.iter().map(|e| e.to_string()).collect(),
    }
}

/// The one error for `key` at `line`, as `gateway.toml:<line>: <key>: <message>`.
fn find<'a>(errors: &'a [String], line: usize, key: &str) -> &'a str {
    let prefix = format!("gateway.toml:{line}: {key}: ");
    let found: Vec<&String> = errors.iter().filter(|e| e.contains(&prefix)).collect();
    assert_eq!(found.len(), 1, "expected one error starting `{prefix}` in:\n{}", errors.join("\n"));
    found[0]
}

#[test]
fn every_error_names_file_line_and_key_all_at_once() {
    let (dir, path) = write_config(BAD);
    let errors = load_errors(&path);
    for (marker, key) in EXPECTED {
        let e = find(&errors, line_of(BAD, marker), key);
        assert!(e.contains(&*dir.path().join("gateway.toml").to_string_lossy()), "the full path: {e}");
    }
    assert_eq!(errors.len(), EXPECTED.len(), "exactly the expected errors:\n{}", errors.join("\n"));

    let suite = find(&errors, line_of(BAD, "@suite"), "server.tls.cipher_suites");
    assert!(suite.contains("TLS_RSA_WITH_RC4_128_SHA"), "names the bad suite: {suite}");
    for valid in
        ["TLS13_AES_128_GCM_SHA256", "TLS13_AES_256_GCM_SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]
    {
        assert!(suite.contains(valid), "lists the valid suites ({valid}): {suite}");
    }
    let issuer = find(&errors, line_of(BAD, "@unknown-issuer"), "routes[0].issuers[0]");
    assert!(issuer.contains("nobody") && issuer.contains("corp"), "{issuer}");
    let jurisdiction = find(&errors, line_of(BAD, "@jurisdiction"), "routes[3].jurisdiction");
    assert!(jurisdiction.contains("XX"), "{jurisdiction}");
    let hs = find(&errors, line_of(BAD, "@hs256"), "issuers[0].algorithms[1]");
    assert!(hs.contains("HS256"), "{hs}");
    let cert = find(&errors, line_of(BAD, "@cert"), "server.tls.cert");
    assert!(cert.contains("missing/gateway.crt") || cert.contains("missing"), "{cert}");
    let unknown = find(&errors, line_of(BAD, "@unknown-key"), "server.listen_port");
    assert!(unknown.contains("unknown"), "{unknown}");
}

fn good_config() -> String {
    support::config_text(
        r#"
[[issuers]]
name = "corp"
issuer = "https://idp.example/"
audiences = ["api"]
jwks_uri = "https://idp.example/jwks.json"

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "http://127.0.0.1:9001"
jurisdiction = "aws:eu-central-1"
issuers = ["corp"]
"#,
    )
}

#[test]
fn a_good_config_loads() {
    let (_dir, path) = write_config(&good_config());
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.routes.len(), 1);
    assert_eq!(cfg.routes[0].jurisdiction.as_str(), "DE");
}

#[test]
fn unknown_keys_are_reported_in_every_section() {
    let text = support::config_text(
        r#"colour = "blue" # @tls

[upstream]
response_timeout = 3 # @upstream

[[issuers]]
name = "corp"
issuer = "https://idp.example/"
audiences = ["api"]
jwks_uri = "https://idp.example/jwks.json"
audience = "api" # @issuer

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "http://127.0.0.1:9001"
jurisdiction = "DE"
issuers = ["corp"]
jurisdictions = ["FR"] # @route
"#,
    );
    let (_dir, path) = write_config(&text);
    let errors = load_errors(&path);
    for (marker, key) in [
        ("@tls", "server.tls.colour"),
        ("@upstream", "upstream.response_timeout"),
        ("@issuer", "issuers[0].audience"),
        ("@route", "routes[0].jurisdictions"),
    ] {
        let e = find(&errors, line_of(&text, marker), key);
        assert!(e.contains("unknown"), "{e}");
    }
    assert_eq!(errors.len(), 4, "{}", errors.join("\n"));
}

fn run_check(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_residency-gateway"))
        .args(["check", "-c"])
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs")
}

#[test]
fn check_exits_1_and_prints_every_error() {
    let (_dir, path) = write_config(BAD);
    let out = run_check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    for (marker, key) in EXPECTED {
        let prefix = format!("gateway.toml:{}: {key}: ", line_of(BAD, marker));
        assert!(stderr.contains(&prefix), "`{prefix}` missing from:\n{stderr}");
    }
}

#[test]
fn check_exits_0_on_a_good_config() {
    let (_dir, path) = write_config(&good_config());
    let out = run_check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}
