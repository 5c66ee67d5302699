//! sluice's modules form layers, each importing only the ones below it (docs/architecture.md):
//! the request path (layers 0–7) never reaches up into the control plane, and no top-level
//! module is in an import cycle. This test reads src/ and fails on an import that points up or
//! closes a cycle, naming the files that make it.

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

/// The top-level modules `code` names as `crate::NAME`, or inside a group
/// (`crate::{NAME::…, NAME}`, over several lines too). Comments are left out: a doc link is not
/// an import. `lib.rs` and `main.rs` name them as `sluice::NAME`, so those paths count too.
fn imported(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .map(|line| line.find("//").map_or(line, |at| &line[..at]))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    for prefix in ["crate::", "sluice::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let after = &rest[at + prefix.len()..];
            let mut found = vec![ident(after)];
            if let Some(group) = after.strip_prefix('{') {
                // Each item at the group's own depth starts with a module name.
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if c.is_whitespace() => {}
                        _ if item_start => {
                            found.push(ident(&group[i..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            }
            names.extend(found.into_iter().filter(|n| modules.contains(n)));
            rest = after;
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

/// The imports of `edges` that point up a layer, described.
fn upward(edges: &BTreeMap<(String, String), BTreeSet<String>>) -> Vec<String> {
    let mut found = Vec::new();
    for ((from, to), files) in edges {
        let (Some(a), Some(b)) = (layer_of(from), layer_of(to)) else {
            continue;
        };
        if b > a {
            found.push(format!(
                "{from} (layer {a}) → {to} (layer {b}) in {files:?}"
            ));
        }
    }
    found
}

#[test]
fn no_import_points_up() {
    let found = upward(&imports(&src()));
    assert!(
        found.is_empty(),
        "imports that point up a layer:\n{}",
        found.join("\n")
    );
}

/// The checks above see what they must: an import written any of the ways src/ writes them,
/// and one that points up.
#[test]
fn the_check_sees_an_upward_import() {
    let names: BTreeSet<String> = ["proxy", "limit", "control"].map(String::from).into();
    let code =
        "use crate::proxy::Proxy;\n// crate::control in a comment\nfn f() { crate::limit::x() }";
    let found = imported(code, &names);
    assert_eq!(found, ["limit", "proxy"].map(String::from).into());
    let mut edges = BTreeMap::new();
    edges.insert(
        ("limit".to_owned(), "proxy".to_owned()),
        BTreeSet::from(["limit/mod.rs".to_owned()]),
    );
    assert_eq!(upward(&edges).len(), 1, "limit (4) → proxy (7) points up");
    edges.clear();
    edges.insert(("proxy".to_owned(), "limit".to_owned()), BTreeSet::new());
    assert!(
        upward(&edges).is_empty(),
        "proxy (7) → limit (4) points down"
    );
}

#[test]
fn no_top_level_module_is_in_an_import_cycle() {
    let edges = imports(&src());
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
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

/// A file a newcomer can read in one sitting: none in src/ is over 500 lines (issue 15).
#[test]
fn no_file_in_src_is_over_500_lines() {
    let long: Vec<String> = rust_files(&src())
        .into_iter()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(&file)
                .expect("a source file")
                .lines()
                .count();
            (lines > 500).then(|| format!("{} ({lines} lines)", file.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over 500 lines: {long:?}");
}
