//! sluice's modules form layers, each importing only the ones below it (README,
//! "Architecture"): the request path (layers 0–7) never reaches up into the control plane, and
//! no top-level module is in an import cycle. This test reads src/ and fails on an import
//! that points up or closes a cycle, naming the files that make it.
//!
//! The redesign that brings the code to these layers (issue 15) goes in steps; the imports it
//! has not removed yet are listed in [`NOT_YET_DOWNWARD`]. The list can only shrink: an edge
//! listed but gone fails the test too, so each step removes its entries.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules of src/ by layer, lowest first. A module imports only modules of lower
/// layers, or of its own layer when that makes no cycle.
const LAYERS: &[(u8, &[&str])] = &[
    // Shared vocabulary: why sluice answers itself, counters and recorders, logging.
    (0, &["reason", "recorders", "stats", "telemetry"]),
    // The pure autoscale engine: settings, windows, evaluation.
    (1, &["autoscale"]),
    // The config file's types, validated.
    (2, &["config"]),
    // How an endpoint is reached: the connector, connections, idle pools, the upload body.
    (3, &["upstream"]),
    // Per-endpoint concurrency and balancing; per-caller rate limits.
    (4, &["balance", "limit"]),
    // The fleet's shared store (Redis).
    (5, &["store"]),
    // The live policy built from the config.
    (6, &["policy"]),
    // The request path.
    (7, &["proxy"]),
    // The control plane: live changes, the admin API, the Prometheus exporter.
    (8, &["control", "admin", "metrics"]),
    // The process: wiring, commands, the demo, the container's health check.
    (9, &["app", "main", "lib", "demo", "healthcheck"]),
];

/// Imports (from, to) that still point up, with the redesign step that removes them.
const NOT_YET_DOWNWARD: &[(&str, &str)] = &[
    // limit uses the store's lease directly (to become a trait limit owns).
    ("limit", "store"),
];

/// Each top-level module's files: src/NAME.rs, or everything under src/NAME/.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut found: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("src/") {
        let path = entry.expect("an entry of src/").path();
        if path.is_dir() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            found.entry(name).or_default().extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            found.entry(name).or_default().push(path);
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level modules `code` names as `crate::NAME` (comments left out: a doc link is not
/// an import). `lib.rs` and `main.rs` name them as `sluice::NAME` or declare them, so their
/// module paths count too.
fn imported(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in code.lines() {
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        for prefix in ["crate::", "sluice::"] {
            let mut rest = code;
            while let Some(at) = rest.find(prefix) {
                let after = &rest[at + prefix.len()..];
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if modules.contains(&name) {
                    names.insert(name);
                }
                rest = after;
            }
        }
    }
    names
}

/// Every (from, to) import between top-level modules, with the files that make it.
fn imports(src: &Path) -> BTreeMap<(String, String), BTreeSet<String>> {
    let modules = modules(src);
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut edges: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (module, files) in &modules {
        for file in files {
            let code = std::fs::read_to_string(file).expect("a source file");
            for to in imported(&code, &names) {
                if &to != module {
                    let shown = file.strip_prefix(src).unwrap_or(file).display().to_string();
                    edges.entry((module.clone(), to)).or_default().insert(shown);
                }
            }
        }
    }
    edges
}

fn layer_of(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .find(|(_, names)| names.contains(&module))
        .map(|(layer, _)| *layer)
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_module_of_src_has_a_layer() {
    let unplaced: Vec<String> = modules(&src())
        .into_keys()
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules with no layer in tests/layers.rs: {unplaced:?}"
    );
}

#[test]
fn no_import_points_up_but_those_the_redesign_has_yet_to_remove() {
    let edges = imports(&src());
    let mut upward = Vec::new();
    let mut still_listed: BTreeSet<(&str, &str)> = NOT_YET_DOWNWARD.iter().copied().collect();
    for ((from, to), files) in &edges {
        let (Some(a), Some(b)) = (layer_of(from), layer_of(to)) else {
            continue;
        };
        if b > a && !still_listed.remove(&(from.as_str(), to.as_str())) {
            upward.push(format!(
                "{from} (layer {a}) → {to} (layer {b}) in {files:?}"
            ));
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up a layer:\n{}",
        upward.join("\n")
    );
    assert!(
        still_listed.is_empty(),
        "these imports are gone: remove them from NOT_YET_DOWNWARD: {still_listed:?}"
    );
}

#[test]
fn no_top_level_module_is_in_an_import_cycle() {
    let edges = imports(&src());
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        if NOT_YET_DOWNWARD.contains(&(from.as_str(), to.as_str())) {
            continue;
        }
        next.entry(from).or_default().push(to);
    }
    // A depth-first walk; a module met again on the current path closes a cycle.
    fn walk<'a>(
        at: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(start) = path.iter().position(|m| *m == at) {
            let mut cycle = path[start..].to_vec();
            cycle.push(at);
            return Some(cycle);
        }
        if !done.insert(at) {
            return None;
        }
        path.push(at);
        for to in next.get(at).into_iter().flatten() {
            if let Some(cycle) = walk(to, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for from in next.keys() {
        if let Some(cycle) = walk(from, &next, &mut Vec::new(), &mut done) {
            let files: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    let key = (w[0].to_owned(), w[1].to_owned());
                    format!("{} → {} in {:?}", w[0], w[1], edges[&key])
                })
                .collect();
            panic!("an import cycle:\n{}", files.join("\n"));
        }
    }
}
