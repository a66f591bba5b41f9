//! `residency-gateway explain`: the decision a route would make for a token or a set of claims, and why —
//! the chain that allowed it (`EEA → EU → DE`) or each region that was checked and why it did not match.

use std::fmt::Write;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{Config, Mode, RouteConfig};
use crate::deny::Reason;
use crate::metrics::Metrics;
use crate::policy::{Jurisdiction, Policy, Refusal};
use crate::token::{Method, Principal, Unavailable, Verifier};

/// What to explain.
pub enum Input {
    /// Claims as JSON, as a token would carry them.
    Claims(String),
    /// A token, verified against its issuer unless `verify` is false.
    Token { token: String, verify: bool },
}

/// Exit codes: documented in README.
pub const EXIT_FORWARD: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_BLOCK: u8 = 3;
pub const EXIT_TOKEN_REJECTED: u8 = 4;

/// Runs the explanation; returns the text to print and the exit code.
pub async fn run(config: &Config, route: &str, input: Input) -> (String, u8) {
    let Some(route) = config.routes.iter().find(|r| r.name == route) else {
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        return (format!("unknown route `{route}`; routes: {}\n", names.join(", ")), EXIT_ERROR);
    };
    let principal = match principal_for(config, route, input).await {
        Ok(p) => p,
        Err(text) => return text,
    };
    let (text, code) = explain(&config.policy, route, &principal);
    (text, code)
}

async fn principal_for(
    config: &Config,
    route: &RouteConfig,
    input: Input,
) -> Result<Principal, (String, u8)> {
    let from_claims = |claims: Map<String, Value>| {
        let iss = claims.get("iss").and_then(Value::as_str);
        let issuer = config.issuers.iter().find(|i| Some(i.issuer.as_str()) == iss);
        let mut rules = config.regions.clone();
        if let Some(c) = issuer.and_then(|i| i.regions_claim.clone()) {
            rules.claim = c;
        }
        let name: Arc<str> = Arc::from(issuer.map_or("(unverified)", |i| i.name.as_str()));
        Principal::from_claims(&name, Method::Jwt, &claims, &rules)
    };
    match input {
        Input::Claims(json) => match serde_json::from_str::<Map<String, Value>>(&json) {
            Ok(claims) => Ok(from_claims(claims)),
            Err(e) => Err((format!("--claims is not a JSON object: {e}\n"), EXIT_ERROR)),
        },
        Input::Token { token, verify: false } => {
            match jsonwebtoken::dangerous::insecure_decode::<Map<String, Value>>(&token) {
                Ok(data) => Ok(from_claims(data.claims)),
                Err(_) => Err((
                    "the token is not a JWT; opaque tokens can only be explained verified\n".into(),
                    EXIT_ERROR,
                )),
            }
        }
        Input::Token { token, verify: true } => {
            let verifier = Verifier::new(config, &Metrics::new())
                .await
                .map_err(|e| (format!("cannot set up token checks: {e}\n"), EXIT_ERROR))?;
            for issuer in verifier.issuers() {
                if let Some(j) = &issuer.jwt {
                    let _ = j.refresh().await;
                }
            }
            match verifier.check(route, &crate::token::Presented::new(&token)).await {
                Ok(Ok(p)) => Ok((*p).clone()),
                Ok(Err(e)) => Err((
                    format!("decision     block\nreason       {}\nwhy          {e}\n", e.reason().as_str()),
                    EXIT_TOKEN_REJECTED,
                )),
                Err(Unavailable) => Err((
                    format!(
                        "decision     block\nreason       {}\nwhy          the token service could not be reached\n",
                        Reason::TokenServiceUnavailable.as_str()
                    ),
                    EXIT_TOKEN_REJECTED,
                )),
            }
        }
    }
}

/// The pure part: how `policy` judges `principal` on `route`.
pub fn explain(policy: &Policy, route: &RouteConfig, principal: &Principal) -> (String, u8) {
    let target = route.jurisdiction;
    let mut out = String::new();
    let mode = route.mode.as_str();
    let _ = writeln!(out, "route        {}", route.name);
    let declared = if route.declared.eq_ignore_ascii_case(target.as_str()) {
        String::new()
    } else {
        format!(" (declared as {})", route.declared)
    };
    let _ = writeln!(out, "upstream     {target}{declared}, mode {mode}");
    let regions = principal.allowed_regions.as_deref().unwrap_or_default();
    let _ = writeln!(
        out,
        "regions      {}",
        if regions.is_empty() { "(none)".to_string() } else { regions.join(" ") }
    );
    match policy.decide(&principal.allowed_regions, &target) {
        Ok(i) => {
            let path = policy.path(&regions[i], &target).unwrap_or_default();
            let _ = writeln!(out, "decision     forward");
            let _ = writeln!(out, "reason       allowed");
            let _ = writeln!(out, "allowed by   {}", path.join(" → "));
            (out, EXIT_FORWARD)
        }
        Err(refusal) => {
            let reason = match refusal {
                Refusal::RegionNotAllowed => Reason::RegionNotAllowed,
                Refusal::NoResidencyClaim => Reason::NoResidencyClaim,
            };
            let decision = match route.mode {
                Mode::Enforce => "block",
                Mode::Monitor => "block (monitor mode: forwarded and counted as would-block)",
            };
            let _ = writeln!(out, "decision     {decision}");
            let _ = writeln!(out, "reason       {}", reason.as_str());
            if refusal == Refusal::NoResidencyClaim {
                let _ = writeln!(
                    out,
                    "why          the token has no usable allowed-regions claim (absent, empty or not a list of strings)"
                );
            }
            for (n, r) in regions.iter().enumerate() {
                let label = if n == 0 { "checked" } else { "" };
                let _ = writeln!(out, "{label:<12} {r}: {}", why_not(policy, r, &target));
            }
            (out, EXIT_BLOCK)
        }
    }
}

fn why_not(policy: &Policy, entry: &str, target: &Jurisdiction) -> String {
    if let Some(n) = policy.group_size(entry) {
        return format!("group of {n} jurisdictions, {target} is not one of them");
    }
    match Jurisdiction::parse(entry) {
        Some(j) if j.is_subdivision() => format!("a subdivision; it allows only {j} itself"),
        Some(j) if !j.is_assigned() => {
            "not an assigned ISO 3166 code nor a group in the policies".to_string()
        }
        Some(j) => format!("a country; it allows {j} and its subdivisions"),
        None => "neither a jurisdiction code nor a group in the policies".to_string(),
    }
}
