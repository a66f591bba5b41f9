//! Residency policy: jurisdictions, region groups and aliases from `policies/`, and `decide()`, the pure
//! function that says whether a token's allowed regions cover an upstream's jurisdiction.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ConfigError, Key, Source};
use crate::iso3166;

/// An ISO 3166-1 alpha-2 country (`DE`) or an ISO 3166-2 subdivision (`US-CA`), upper-case.
/// Stored inline so the per-request decision compares bytes and never allocates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jurisdiction {
    buf: [u8; 6],
    len: u8,
}

impl Jurisdiction {
    /// Parses `CC` or `CC-XXX` (one to three letters or digits after the hyphen), case-insensitively.
    /// Only the shape is checked here; [`Jurisdiction::is_assigned`] checks the country list.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        let shape_ok = match b.len() {
            2 => true,
            4..=6 => b[2] == b'-' && b[3..].iter().all(u8::is_ascii_alphanumeric),
            _ => false,
        };
        if !shape_ok || !b[..2].iter().all(u8::is_ascii_alphabetic) {
            return None;
        }
        let mut buf = [0u8; 6];
        for (d, s) in buf.iter_mut().zip(b) {
            *d = s.to_ascii_uppercase();
        }
        Some(Jurisdiction { buf, len: b.len() as u8 })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("??")
    }

    pub fn is_subdivision(&self) -> bool {
        self.len > 2
    }

    /// The country part: `US` for `US-CA`, itself for a country.
    pub fn country(&self) -> Jurisdiction {
        let mut buf = [0u8; 6];
        buf[..2].copy_from_slice(&self.buf[..2]);
        Jurisdiction { buf, len: 2 }
    }

    /// True when the country part is an officially assigned ISO 3166-1 alpha-2 code.
    pub fn is_assigned(&self) -> bool {
        iso3166::is_alpha2(self.country().as_str())
    }

    /// Whether an allowed entry that is this jurisdiction also allows `target`: itself, or one of
    /// its subdivisions when this is a country (`US` allows `US-CA`; `US-CA` allows neither `US` nor `US-NY`).
    pub fn covers(&self, target: &Jurisdiction) -> bool {
        self == target || (!self.is_subdivision() && target.is_subdivision() && target.country() == *self)
    }
}

impl fmt::Display for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// A group member as written in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Jurisdiction(Jurisdiction),
    Group(String),
}

#[derive(Debug)]
struct Group {
    members: Vec<Member>,
    /// Every jurisdiction reachable through the members, computed once at load.
    expanded: HashSet<Jurisdiction>,
}

/// Region groups and aliases, merged from every file in `policy.dir`, groups expanded at load.
#[derive(Debug, Default)]
pub struct Policy {
    groups: HashMap<String, Group>,
    aliases: HashMap<String, Jurisdiction>,
}

/// Why a residency check did not allow the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The token carries allowed regions, none of which covers the upstream's jurisdiction.
    RegionNotAllowed,
    /// The token has no usable regions claim: absent, empty or of the wrong type.
    NoResidencyClaim,
}

/// The allowed regions read from a token: upper-cased entries, each a jurisdiction or a group name.
/// `None` means absent, empty or mistyped, which is always a block.
pub type AllowedRegions = Option<Vec<String>>;

impl Policy {
    /// Does some entry of `allowed` expand to `target`? Returns the index of the first entry that does.
    pub fn decide(&self, allowed: &AllowedRegions, target: &Jurisdiction) -> Result<usize, Refusal> {
        let allowed = match allowed {
            Some(list) if !list.is_empty() => list,
            _ => return Err(Refusal::NoResidencyClaim),
        };
        allowed.iter().position(|entry| self.entry_covers(entry, target)).ok_or(Refusal::RegionNotAllowed)
    }

    fn entry_covers(&self, entry: &str, target: &Jurisdiction) -> bool {
        // Groups first: a group may take a reserved, unassigned code such as `EU` as its name.
        match self.groups.get(entry) {
            Some(g) => {
                g.expanded.contains(target)
                    || (target.is_subdivision() && g.expanded.contains(&target.country()))
            }
            None => Jurisdiction::parse(entry).is_some_and(|j| j.covers(target)),
        }
    }

    /// Resolves an upstream declaration: a jurisdiction code or an alias.
    pub fn resolve(&self, declared: &str) -> Option<Jurisdiction> {
        if let Some(j) = self.aliases.get(&declared.to_ascii_lowercase()) {
            return Some(*j);
        }
        Jurisdiction::parse(declared).filter(Jurisdiction::is_assigned)
    }

    /// How many jurisdictions a group expands to.
    pub fn group_size(&self, name: &str) -> Option<usize> {
        self.groups.get(name).map(|g| g.expanded.len())
    }

    pub fn has_group(&self, name: &str) -> bool {
        self.groups.contains_key(&name.to_ascii_uppercase())
    }

    /// True when some group contains `j` (or its country).
    pub fn any_group_contains(&self, j: &Jurisdiction) -> bool {
        self.groups.values().any(|g| g.expanded.contains(j) || g.expanded.contains(&j.country()))
    }

    /// The chain from an allowed entry down to `target`, for explanations: `["EEA", "EU", "DE"]`.
    pub fn path(&self, entry: &str, target: &Jurisdiction) -> Option<Vec<String>> {
        let Some(group) = self.groups.get(entry) else {
            let j = Jurisdiction::parse(entry)?;
            return j.covers(target).then(|| {
                let mut p = vec![j.to_string()];
                if j != *target {
                    p.push(target.to_string());
                }
                p
            });
        };
        if !(group.expanded.contains(target) || group.expanded.contains(&target.country())) {
            return None;
        }
        let mut path = vec![entry.to_string()];
        for m in &group.members {
            let sub = match m {
                Member::Jurisdiction(j) => self.path(j.as_str(), target),
                Member::Group(g) => self.path(g, target),
            };
            if let Some(sub) = sub {
                path.extend(sub);
                return Some(path);
            }
        }
        Some(path)
    }

    /// Loads and merges every `*.toml` in `dir`, reporting every problem at once.
    pub fn load_dir(dir: &Path) -> Result<Policy, Vec<ConfigError>> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) => {
                return Err(vec![ConfigError::file(dir, format!("cannot read policy directory: {e}"))]);
            }
        };
        files.sort();
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for f in &files {
            match Source::read(f) {
                Ok(s) => sources.push(s),
                Err(e) => errors.push(e),
            }
        }
        match Policy::from_sources(&sources) {
            Ok(p) if errors.is_empty() => Ok(p),
            Ok(_) => Err(errors),
            Err(mut more) => {
                errors.append(&mut more);
                Err(errors)
            }
        }
    }

    /// Builds a policy from already-read policy files.
    pub fn from_sources(sources: &[Source]) -> Result<Policy, Vec<ConfigError>> {
        #[derive(Deserialize, Default)]
        struct RawPolicy {
            #[serde(default)]
            groups: BTreeMap<String, Vec<String>>,
            #[serde(default)]
            aliases: BTreeMap<String, String>,
        }

        let mut errors = Vec::new();
        // name -> (members, file index) so duplicates and members can be reported where they stand.
        let mut raw_groups: RawGroups = BTreeMap::new();
        let mut aliases = HashMap::new();
        let mut raw_aliases: Vec<(String, String, usize, Key)> = Vec::new();

        for (fi, src) in sources.iter().enumerate() {
            let raw: RawPolicy = match src.deserialize(&mut errors) {
                Some(r) => r,
                None => continue,
            };
            for (name, members) in raw.groups {
                let key = Key::root().field("groups").field(&name);
                let upper = name.to_ascii_uppercase();
                if !valid_group_name(&upper) {
                    errors.push(src.error(
                        &key,
                        "a group name is two or more letters, digits and hyphens, and not an assigned \
                         jurisdiction code",
                    ));
                    continue;
                }
                if let Some((_, other, _)) = raw_groups.get(&upper) {
                    errors.push(src.error(
                        &key,
                        format!("group `{upper}` is already defined in {}", sources[*other].file.display()),
                    ));
                    continue;
                }
                let mut parsed = Vec::new();
                for (i, m) in members.iter().enumerate() {
                    // Anything that is not an assigned code is taken as a group name and checked below.
                    match Jurisdiction::parse(m) {
                        Some(j) if j.is_assigned() => parsed.push((i, Member::Jurisdiction(j))),
                        _ => parsed.push((i, Member::Group(m.to_ascii_uppercase()))),
                    }
                }
                raw_groups.insert(upper, (parsed, fi, key));
            }
            for (name, target) in raw.aliases {
                let key = Key::root().field("aliases").field(&name);
                raw_aliases.push((name, target, fi, key));
            }
        }

        // Unknown group members, then cycles.
        for (name, (members, fi, key)) in &raw_groups {
            for (i, m) in members {
                if let Member::Group(g) = m
                    && !raw_groups.contains_key(g)
                {
                    let message = if looks_like_subdivision(g) {
                        format!("`{g}` is not a valid ISO 3166-2 subdivision code")
                    } else {
                        format!("group `{name}` names `{g}`, which is neither a jurisdiction nor a group")
                    };
                    errors.push(sources[*fi].error(&key.index(*i), message));
                }
            }
        }
        let mut groups = HashMap::new();
        let mut memo = HashMap::new();
        for (name, (members, fi, key)) in &raw_groups {
            let mut expanded = HashSet::new();
            let mut stack = vec![name.clone()];
            if let Err(cycle) = expand(&raw_groups, name, &mut stack, &mut expanded, &mut memo) {
                errors.push(sources[*fi].error(key, format!("group cycle: {}", cycle.join(" → "))));
                continue;
            }
            groups.insert(
                name.clone(),
                Group { members: members.iter().map(|(_, m)| m.clone()).collect(), expanded },
            );
        }

        for (name, target, fi, key) in raw_aliases {
            let src = &sources[fi];
            let slot = match aliases.entry(name.to_ascii_lowercase()) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    errors.push(src.error(&key, format!("alias `{name}` is defined twice")));
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(slot) => slot,
            };
            if Jurisdiction::parse(&name).is_some() {
                errors.push(src.error(&key, "an alias must not look like a jurisdiction code"));
            } else if raw_groups.contains_key(&target.to_ascii_uppercase()) {
                errors.push(src.error(
                    &key,
                    format!("alias `{name}` points to group `{target}`; it must name one jurisdiction"),
                ));
            } else {
                match Jurisdiction::parse(&target).filter(Jurisdiction::is_assigned) {
                    Some(j) => {
                        slot.insert(j);
                    }
                    None => errors
                        .push(src.error(&key, format!("`{target}` is not an ISO 3166 jurisdiction code"))),
                }
            }
        }

        if errors.is_empty() { Ok(Policy { groups, aliases }) } else { Err(errors) }
    }
}

/// Group name -> (members with their index in the file's list, file index, key), before expansion.
type RawGroups = BTreeMap<String, (Vec<(usize, Member)>, usize, Key)>;

fn valid_group_name(name: &str) -> bool {
    name.len() >= 2
        && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
        && !Jurisdiction::parse(name).is_some_and(|j| j.is_assigned())
}

/// `US-TOOLONG`, `DE-` or `FR-7_`: an assigned country, a hyphen, and a tail that is not 1-3 letters/digits.
fn looks_like_subdivision(m: &str) -> bool {
    m.len() > 2
        && m.as_bytes()[2] == b'-'
        && Jurisdiction::parse(&m[..2]).is_some_and(|j| j.is_assigned())
        && Jurisdiction::parse(m).is_none()
}

/// Depth-first expansion; `stack` holds the chain being expanded so a cycle can be named, and `memo` the
/// groups already expanded, so a group shared by many others is expanded once (linear, not exponential).
fn expand(
    raw: &RawGroups,
    name: &str,
    stack: &mut Vec<String>,
    out: &mut HashSet<Jurisdiction>,
    memo: &mut HashMap<String, HashSet<Jurisdiction>>,
) -> Result<(), Vec<String>> {
    let Some((members, _, _)) = raw.get(name) else {
        return Ok(());
    };
    for (_, m) in members {
        match m {
            Member::Jurisdiction(j) => {
                out.insert(*j);
            }
            Member::Group(g) => {
                if stack.iter().any(|s| s == g) {
                    let mut cycle = stack.clone();
                    cycle.push(g.clone());
                    return Err(cycle);
                }
                if let Some(done) = memo.get(g) {
                    out.extend(done.iter().copied());
                    continue;
                }
                stack.push(g.clone());
                let mut sub = HashSet::new();
                expand(raw, g, stack, &mut sub, memo)?;
                stack.pop();
                out.extend(sub.iter().copied());
                memo.insert(g.clone(), sub);
            }
        }
    }
    Ok(())
}

/// Reads the allowed regions from a claim value: a JSON array of strings or one space-delimited string.
/// Anything else (absent, empty, a number, an array holding a non-string) is `None`.
pub fn regions_from_claim(value: Option<&serde_json::Value>) -> AllowedRegions {
    let list: Vec<String> = match value? {
        serde_json::Value::String(s) => s.split_ascii_whitespace().map(str::to_ascii_uppercase).collect(),
        serde_json::Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                let s = item.as_str()?.trim();
                if s.is_empty() || s.contains(char::is_whitespace) {
                    return None;
                }
                out.push(s.to_ascii_uppercase());
            }
            out
        }
        _ => return None,
    };
    (!list.is_empty()).then_some(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Jurisdiction {
        Jurisdiction::parse(s).unwrap()
    }

    fn policy(text: &str) -> Policy {
        let src = Source::from_text("test.toml", text.to_string()).unwrap();
        Policy::from_sources(&[src]).unwrap()
    }

    fn sample() -> Policy {
        policy(
            r#"
            [groups]
            EU = ["AT", "DE", "FR", "IE"]
            EEA = ["EU", "IS", "LI", "NO"]
            WEST = ["EEA", "US-CA"]
            [aliases]
            "aws:eu-central-1" = "DE"
            "#,
        )
    }

    fn regions(list: &[&str]) -> AllowedRegions {
        Some(list.iter().map(|s| s.to_ascii_uppercase()).collect())
    }

    #[test]
    fn parse_shapes() {
        assert_eq!(j("de").as_str(), "DE");
        assert_eq!(j("us-ca").as_str(), "US-CA");
        assert_eq!(j("FR-75C").as_str(), "FR-75C");
        for bad in ["", "D", "DEU", "US-", "US-CAXX", "U1", "US_CA", "1S-CA", "US-C A"] {
            assert!(Jurisdiction::parse(bad).is_none(), "{bad}");
        }
        assert!(!j("XX").is_assigned());
        assert!(j("US-XX").is_assigned(), "only the country part is checked against ISO 3166-1");
    }

    #[test]
    fn decision_table() {
        let p = sample();
        let cases: &[(&[&str], &str, Result<usize, Refusal>)] = &[
            (&["DE"], "DE", Ok(0)),
            (&["de"], "DE", Ok(0)),
            (&["FR", "DE"], "DE", Ok(1)),
            (&["FR"], "DE", Err(Refusal::RegionNotAllowed)),
            (&["EU"], "DE", Ok(0)),
            (&["eu"], "DE", Ok(0)),
            (&["EEA"], "DE", Ok(0)),
            (&["EEA"], "NO", Ok(0)),
            (&["EU"], "NO", Err(Refusal::RegionNotAllowed)),
            (&["US"], "US-CA", Ok(0)),
            (&["US-CA"], "US-CA", Ok(0)),
            (&["US-CA"], "US-NY", Err(Refusal::RegionNotAllowed)),
            (&["US-CA"], "US", Err(Refusal::RegionNotAllowed)),
            (&["WEST"], "US-CA", Ok(0)),
            (&["WEST"], "US-NY", Err(Refusal::RegionNotAllowed)),
            (&["EU"], "DE-BY", Ok(0)),
            (&["UNKNOWN-GROUP"], "DE", Err(Refusal::RegionNotAllowed)),
            (&[], "DE", Err(Refusal::NoResidencyClaim)),
        ];
        for (allowed, target, want) in cases {
            assert_eq!(p.decide(&regions(allowed), &j(target)), *want, "{allowed:?} -> {target}");
        }
        assert_eq!(p.decide(&None, &j("DE")), Err(Refusal::NoResidencyClaim));
    }

    #[test]
    fn aliases_resolve() {
        let p = sample();
        assert_eq!(p.resolve("aws:eu-central-1"), Some(j("DE")));
        assert_eq!(p.resolve("AWS:EU-CENTRAL-1"), Some(j("DE")));
        assert_eq!(p.resolve("us-ca"), Some(j("US-CA")));
        assert_eq!(p.resolve("XX"), None);
        assert_eq!(p.resolve("aws:nowhere-1"), None);
    }

    #[test]
    fn explain_path() {
        let p = sample();
        assert_eq!(p.path("EEA", &j("DE")).unwrap(), ["EEA", "EU", "DE"]);
        assert_eq!(p.path("US", &j("US-CA")).unwrap(), ["US", "US-CA"]);
        assert_eq!(p.path("EU", &j("NO")), None);
    }

    #[test]
    fn claim_shapes() {
        use serde_json::json;
        assert_eq!(regions_from_claim(Some(&json!(["eu", "US-CA"]))), regions(&["EU", "US-CA"]));
        assert_eq!(regions_from_claim(Some(&json!("EU  us-ca"))), regions(&["EU", "US-CA"]));
        for bad in
            [json!([]), json!(""), json!("  "), json!(7), json!({"a": 1}), json!(["EU", 1]), json!(null)]
        {
            assert_eq!(regions_from_claim(Some(&bad)), None, "{bad}");
        }
        assert_eq!(regions_from_claim(None), None);
    }

    fn load_errors(files: &[(&str, &str)]) -> Vec<String> {
        let sources: Vec<Source> =
            files.iter().map(|(n, t)| Source::from_text(n, t.to_string()).unwrap()).collect();
        Policy::from_sources(&sources).unwrap_err().into_iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn validation_errors_name_file_line_and_key() {
        let errs = load_errors(&[
            ("a.toml", "[groups]\nEU = [\"DE\", \"XX\"]\nLOOP = [\"LOOP2\"]\nLOOP2 = [\"LOOP\"]\n"),
            (
                "b.toml",
                "[groups]\nEU = [\"FR\"]\nBAD = [\"US-TOOLONG\"]\n[aliases]\n\"x:y\" = \"EU\"\n\"x:z\" = \"QQ\"\n",
            ),
        ]);
        let joined = errs.join("\n");
        assert!(
            joined.contains("a.toml:2: groups.EU[1]: group `EU` names `XX`, which is neither"),
            "{joined}"
        );
        assert!(joined.contains("a.toml:3: groups.LOOP: group cycle: LOOP → LOOP2 → LOOP"), "{joined}");
        assert!(joined.contains("b.toml:2: groups.EU: group `EU` is already defined in a.toml"), "{joined}");
        assert!(
            joined.contains("b.toml:3: groups.BAD[0]: `US-TOOLONG` is not a valid ISO 3166-2"),
            "{joined}"
        );
        assert!(joined.contains("b.toml:5: aliases.x:y: alias `x:y` points to group `EU`"), "{joined}");
        assert!(
            joined.contains("b.toml:6: aliases.x:z: `QQ` is not an ISO 3166 jurisdiction code"),
            "{joined}"
        );
    }

    #[test]
    fn unknown_member_and_unknown_key() {
        let errs = load_errors(&[("a.toml", "[groups]\nEU = [\"NOPE\"]\n[other]\nx = 1\n")]);
        let joined = errs.join("\n");
        assert!(joined.contains("a.toml:2: groups.EU[0]: group `EU` names `NOPE`"), "{joined}");
        assert!(joined.contains("a.toml:3: other: unknown key"), "{joined}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const CODES: &[&str] = &["DE", "FR", "NO", "US", "US-CA", "US-NY", "BR", "BR-SP", "JP", "IE"];

    /// Groups G0X..GnX where GiX may contain codes and any GjX with j < i, so there is never a cycle.
    fn groups() -> impl Strategy<Value = Vec<Vec<String>>> {
        prop::collection::vec(prop::collection::vec(0usize..CODES.len() + 6, 0..6), 1..7).prop_map(|raw| {
            raw.iter()
                .enumerate()
                .map(|(i, members)| {
                    members
                        .iter()
                        .filter_map(|&m| match m.checked_sub(CODES.len()) {
                            None => Some(CODES[m].to_string()),
                            Some(g) if g < i => Some(format!("G{g}X")),
                            Some(_) => None,
                        })
                        .collect()
                })
                .collect()
        })
    }

    /// The rule, written the slow way: expand recursively, then apply the subdivision rule.
    fn naive_allows(groups: &[Vec<String>], entry: &str, target: &str) -> bool {
        let group =
            entry.strip_prefix('G').and_then(|g| g.strip_suffix('X')).and_then(|g| g.parse::<usize>().ok());
        if let Some(i) = group {
            return groups[i].iter().any(|m| naive_allows(groups, m, target));
        }
        entry == target
            || (entry.len() == 2 && target.len() > 3 && target.starts_with(entry) && &target[2..3] == "-")
    }

    proptest! {
        #[test]
        fn decide_matches_the_expansion(
            gs in groups(),
            entries in prop::collection::vec(0usize..CODES.len() + 6, 0..4),
            target in 0usize..CODES.len(),
        ) {
            let mut text = String::from("[groups]\n");
            for (i, members) in gs.iter().enumerate() {
                let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
                text.push_str(&format!("G{i}X = [{}]\n", list.join(", ")));
            }
            let src = Source::from_text("p.toml", text).unwrap();
            let policy = Policy::from_sources(&[src]).unwrap();
            let entries: Vec<String> = entries
                .iter()
                .map(|&e| match e.checked_sub(CODES.len()) {
                    None => CODES[e].to_string(),
                    Some(g) => format!("G{}X", g % gs.len()),
                })
                .collect();
            let target_code = CODES[target];
            let want = entries.iter().any(|e| naive_allows(&gs, e, target_code));
            let got = policy.decide(&Some(entries.clone()), &Jurisdiction::parse(target_code).unwrap());
            if entries.is_empty() {
                prop_assert_eq!(got, Err(Refusal::NoResidencyClaim));
            } else {
                prop_assert_eq!(got.is_ok(), want, "entries {:?} target {}", entries, target_code);
            }
        }
    }
}
