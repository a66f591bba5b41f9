//! The residency decision as group nesting deepens: groups are expanded at load, so the per-request
//! cost should stay flat.
//!
//! Run with: cargo bench --bench policy

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use residency_gateway::config::Source;
use residency_gateway::policy::{Jurisdiction, Policy};

/// G0 = ["DE", …], G1 = ["G0", "FR"], …: the top group reaches DE through `depth` levels.
fn nested(depth: usize) -> Policy {
    let mut text = String::from("[groups]\nLEVEL0 = [\"DE\", \"AT\", \"BE\"]\n");
    for d in 1..=depth {
        text.push_str(&format!("LEVEL{d} = [\"LEVEL{}\", \"FR\", \"US-CA\"]\n", d - 1));
    }
    Policy::from_sources(&[Source::from_text("bench.toml", text).unwrap()]).unwrap()
}

fn decide(c: &mut Criterion) {
    let de = Jurisdiction::parse("DE").unwrap();
    let us_ny = Jurisdiction::parse("US-NY").unwrap();
    let mut group = c.benchmark_group("decide_by_nesting_depth");
    for depth in [1usize, 4, 16, 64] {
        let policy = nested(depth);
        let allowed = Some(vec![format!("LEVEL{depth}")]);
        group.bench_with_input(BenchmarkId::new("allowed", depth), &depth, |b, _| {
            b.iter(|| policy.decide(std::hint::black_box(&allowed), std::hint::black_box(&de)))
        });
        group.bench_with_input(BenchmarkId::new("refused", depth), &depth, |b, _| {
            b.iter(|| policy.decide(std::hint::black_box(&allowed), std::hint::black_box(&us_ny)))
        });
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
