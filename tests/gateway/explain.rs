//! `explain` and `check` as ops run them: the binary, a config on disk, golden output and exit codes.

use std::process::Command;

use serde_json::json;

use crate::support::{Idp, config_text, prepare_dir};

const BIN: &str = env!("CARGO_BIN_EXE_residency-gateway");

fn setup(issuer: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let pki = residency_gateway::dev::Pki::new("test CA").unwrap();
    let dir = prepare_dir(&pki);
    let body = format!(
        r#"{issuer}
[[routes]]
name = "orders-eu"
path_prefix = "/orders"
upstream = "https://orders.eu.internal"
jurisdiction = "aws:eu-central-1"
issuers = ["corp"]

[[routes]]
name = "orders-us"
path_prefix = "/us"
upstream = "https://orders.us.internal"
jurisdiction = "US-CA"
issuers = ["corp"]
mode = "monitor"
"#
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config_text(&body)).unwrap();
    (dir, path)
}

const OFFLINE_ISSUER: &str = "[[issuers]]\nname = \"corp\"\nissuer = \"https://idp.example/\"\n\
                              audiences = [\"api\"]\njwks_uri = \"https://idp.example/jwks\"\n";

fn explain(path: &std::path::Path, args: &[&str]) -> (String, i32) {
    let out = Command::new(BIN).arg("explain").arg("-c").arg(path).args(args).output().unwrap();
    (String::from_utf8(out.stdout).unwrap(), out.status.code().unwrap())
}

#[test]
fn explain_shows_the_chain_that_allowed_a_transfer() {
    let (_dir, path) = setup(OFFLINE_ISSUER);
    let (out, code) =
        explain(&path, &["--route", "orders-eu", "--claims", r#"{"allowed_regions": ["US", "eea"]}"#]);
    assert_eq!(
        out,
        "route        orders-eu\n\
         upstream     DE (declared as aws:eu-central-1), mode enforce\n\
         regions      US EEA\n\
         decision     forward\n\
         reason       allowed\n\
         allowed by   EEA → EU → DE\n"
    );
    assert_eq!(code, 0);
}

#[test]
fn explain_shows_every_region_checked_when_blocked() {
    let (_dir, path) = setup(OFFLINE_ISSUER);
    let claims = r#"{"allowed_regions": "EEA US-NY BR MARS"}"#;
    let (out, code) = explain(&path, &["--route", "orders-us", "--claims", claims]);
    assert_eq!(
        out,
        "route        orders-us\n\
         upstream     US-CA, mode monitor\n\
         regions      EEA US-NY BR MARS\n\
         decision     block (monitor mode: forwarded and counted as would-block)\n\
         reason       region_not_allowed\n\
         checked      EEA: group of 30 jurisdictions, US-CA is not one of them\n\
         \x20            US-NY: a subdivision; it allows only US-NY itself\n\
         \x20            BR: a country; it allows BR and its subdivisions\n\
         \x20            MARS: neither a jurisdiction code nor a group in the policies\n"
    );
    assert_eq!(code, 3);
}

#[test]
fn explain_without_a_claim_and_with_bad_input() {
    let (_dir, path) = setup(OFFLINE_ISSUER);
    let (out, code) = explain(&path, &["--route", "orders-eu", "--claims", r#"{"sub": "x"}"#]);
    assert!(
        out.contains("regions      (none)\ndecision     block\nreason       no_residency_claim\n"),
        "{out}"
    );
    assert_eq!(code, 3);
    let (out, code) = explain(&path, &["--route", "nope", "--claims", "{}"]);
    assert_eq!((out.as_str(), code), ("unknown route `nope`; routes: orders-eu, orders-us\n", 1));
    let (_, code) = explain(&path, &["--route", "orders-eu", "--claims", "[1]"]);
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_verifies_a_token_unless_told_not_to() {
    let idp = Idp::start().await;
    let issuer = format!(
        "[[issuers]]\nname = \"corp\"\nissuer = \"{}\"\naudiences = [\"api\"]\njwks_uri = \"{}\"\n",
        idp.issuer(),
        idp.jwks_uri()
    );
    let (_dir, path) = setup(&issuer);
    let good = idp.token(json!(["EU"]));
    let (out, code) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || explain(&path, &["--route", "orders-eu", "--token", &good])
    })
    .await
    .unwrap();
    assert!(out.contains("decision     forward\n") && out.contains("allowed by   EU → DE\n"), "{out}");
    assert_eq!(code, 0);

    let mut claims = idp.claims(json!(["EU"]));
    claims["exp"] = json!(1);
    let expired = idp.rs256(&claims);
    let (out, code) = tokio::task::spawn_blocking({
        let (path, t) = (path.clone(), expired.clone());
        move || explain(&path, &["--route", "orders-eu", "--token", &t])
    })
    .await
    .unwrap();
    assert_eq!(out, "decision     block\nreason       expired_token\nwhy          the token has expired\n");
    assert_eq!(code, 4);
    assert!(!out.contains(&expired), "the token is never printed");

    let (out, code) = tokio::task::spawn_blocking(move || {
        explain(&path, &["--route", "orders-eu", "--token", &expired, "--no-verify"])
    })
    .await
    .unwrap();
    assert!(out.contains("decision     forward\n"), "--no-verify only decodes: {out}");
    assert_eq!(code, 0);
}

#[test]
fn check_reports_policy_errors_with_file_and_line_and_warns_about_ungrouped_routes() {
    let (dir, path) = setup(OFFLINE_ISSUER);
    let out = Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).is_empty(), "shipped policies group DE and US-CA");

    // A route in a country no group names: a warning, not an error.
    let text =
        std::fs::read_to_string(&path).unwrap().replace("jurisdiction = \"US-CA\"", "jurisdiction = \"AQ\"");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("routes[1].jurisdiction: no region group contains AQ"),
        "{stderr}"
    );

    // Policy mistakes in a new file: every one reported, each with its file and line.
    std::fs::write(
        dir.path().join("policies/local.toml"),
        "[groups]\nEU = [\"DE\"]\nOURS = [\"DE\", \"ZZ\", \"US-TOOLONG\"]\nLOOP-A = [\"LOOP-B\"]\nLOOP-B = [\"LOOP-A\"]\n\n[aliases]\n\"dc:x\" = \"EEA\"\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    for want in [
        "local.toml:2: groups.EU: group `EU` is already defined in",
        "local.toml:3: groups.OURS[1]: group `OURS` names `ZZ`, which is neither a jurisdiction nor a group",
        "local.toml:3: groups.OURS[2]: `US-TOOLONG` is not a valid ISO 3166-2 subdivision code",
        "local.toml:4: groups.LOOP-A: group cycle: LOOP-A → LOOP-B → LOOP-A",
        "local.toml:8: aliases.dc:x: alias `dc:x` points to group `EEA`; it must name one jurisdiction",
    ] {
        assert!(stderr.contains(want), "missing `{want}` in:\n{stderr}");
    }
}
