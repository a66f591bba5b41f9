//! The residency decision on arbitrary claim values: `policy::regions_from_claim` on any JSON, then
//! `Policy::decide` against the shipped policies (the ones `dev` embeds), for a set of jurisdictions.
//!
//! Input: a JSON document (the regions claim's value). Oracles besides "no panic": a claim that is not
//! a non-empty array of strings or a string is a block (`NoResidencyClaim`), the index `decide` returns
//! names an entry that on its own allows the target, and `explain`'s path agrees with `decide`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use residency_gateway::config::Source;
use residency_gateway::dev::EMBEDDED_POLICIES;
use residency_gateway::policy::{Jurisdiction, Policy, Refusal, regions_from_claim};
use serde_json::Value;

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        let sources: Vec<Source> = EMBEDDED_POLICIES
            .iter()
            .map(|(name, text)| Source::from_text(name, text.to_string()).expect("shipped policy parses"))
            .collect();
        Policy::from_sources(&sources).expect("shipped policies load")
    })
}

const TARGETS: &[&str] =
    &["DE", "FR", "IE", "NO", "CH", "GB", "US", "US-CA", "US-NY", "BR", "BR-SP", "CN", "JP"];

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let allowed = regions_from_claim(Some(&value));
    let well_typed = match &value {
        Value::String(s) => s.split_ascii_whitespace().next().is_some(),
        Value::Array(items) => !items.is_empty() && items.iter().all(Value::is_string),
        _ => false,
    };
    if !well_typed {
        assert!(allowed.is_none(), "a mistyped or empty claim gave regions {allowed:?}");
    }
    let policy = policy();
    for t in TARGETS {
        let target = Jurisdiction::parse(t).unwrap();
        match policy.decide(&allowed, &target) {
            Ok(i) => {
                let list = allowed.as_ref().expect("allowed with no regions");
                let entry = &list[i];
                assert!(
                    policy.decide(&Some(vec![entry.clone()]), &target).is_ok(),
                    "entry {entry} allowed {t} in a list but not alone"
                );
                assert!(
                    policy.path(entry, &target).is_some(),
                    "decide allowed {t} by {entry}, explain has no path"
                );
                // The entries before `i` do not allow it.
                for e in &list[..i] {
                    assert!(policy.path(e, &target).is_none(), "entry {e} before {entry} also allows {t}");
                }
            }
            Err(Refusal::NoResidencyClaim) => assert!(allowed.as_ref().is_none_or(Vec::is_empty)),
            Err(Refusal::RegionNotAllowed) => {
                for e in allowed.as_ref().expect("refused by region with no regions") {
                    assert!(policy.path(e, &target).is_none(), "explain allows {t} by {e}, decide does not");
                }
            }
        }
    }
});
