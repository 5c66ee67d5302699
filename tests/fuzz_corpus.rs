//! The fuzz harnesses on stable: every committed seed and regression input (fuzz/seeds,
//! fuzz/regressions) is replayed, then seeded random and mutated inputs run for a few
//! thousand cases per target. libFuzzer (`bench/fuzz.sh`, nightly) explores far more; this
//! keeps what it found fixed in every `cargo test`.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The committed inputs of `target`: seeds and regressions.
fn committed(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if path.is_file() {
                inputs.push(std::fs::read(&path).unwrap());
            }
        }
    }
    inputs
}

/// Replay the committed inputs, then `cases` random ones: half fresh bytes, half mutations
/// of a committed input (flipped, inserted, deleted and copied bytes).
fn run(target: &str, cases: usize, harness: fn(&[u8])) {
    let inputs = committed(target);
    assert!(!inputs.is_empty(), "no seeds for {target}");
    for input in &inputs {
        harness(input);
    }
    let mut rng = SmallRng::seed_from_u64(0x5_1u64 << 32 | target.len() as u64);
    for case in 0..cases {
        let mut data: Vec<u8> = if case % 2 == 0 {
            let len = rng.gen_range(0..256);
            (0..len).map(|_| rng.gen()).collect()
        } else {
            inputs[rng.gen_range(0..inputs.len())].clone()
        };
        for _ in 0..rng.gen_range(0..8) {
            let at = if data.is_empty() {
                0
            } else {
                rng.gen_range(0..data.len())
            };
            match rng.gen_range(0..4) {
                0 if !data.is_empty() => data[at] ^= 1 << rng.gen_range(0..8),
                1 => data.insert(at, rng.gen()),
                2 if !data.is_empty() => {
                    data.remove(at);
                }
                _ if !data.is_empty() => {
                    let from = rng.gen_range(0..data.len());
                    data[at] = data[from];
                }
                _ => data.push(rng.gen()),
            }
        }
        let outcome = std::panic::catch_unwind(|| harness(&data));
        if outcome.is_err() {
            panic!("{target} failed on input {data:?} (add it to fuzz/regressions/{target}/)");
        }
    }
}

#[test]
fn config_parsing_and_validation() {
    run("config", 3000, harness::config);
}

#[test]
fn key_extraction_and_ratelimit_headers() {
    run("keys", 5000, harness::keys);
}

#[test]
fn autoscale_rule_evaluation() {
    run("autoscale", 20_000, harness::autoscale);
}

#[test]
fn admin_json_payloads() {
    run("admin", 500, harness::admin);
}
