//! The architecture's greppable invariants (`docs/ARCHITECTURE.md`, "Architecture
//! invariants"), checked on the source after rust-analyzer's tidy test: what the pure cores may
//! not touch, which folder alone may name redb, the libp2p swarm, the control API and anyhow,
//! that the job types are a leaf, that no module depends on itself through others, and that no
//! function in `node/src` is longer than 150 lines. Test modules are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `node/src`, as (path relative to it, code without its test module
/// and without comment lines).
fn node_sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/src");
    let mut out = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("node/src is readable") {
            let path: PathBuf = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(&root)
                    .expect("under node/src")
                    .to_string_lossy()
                    .replace('\\', "/");
                let text = std::fs::read_to_string(&path).expect("a source file is readable");
                out.push((rel, code(&text)));
            }
        }
    }
    assert!(out.len() > 20, "node/src not found from the tests crate");
    out.sort();
    out
}

/// The code of a file: without its `#[cfg(test)] mod tests` and without comment lines.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Files outside the folders in `allowed` that mention any of `words`.
fn offenders(words: &[&str], allowed: &[&str]) -> Vec<String> {
    node_sources()
        .into_iter()
        .filter(|(rel, _)| !allowed.iter().any(|a| rel.starts_with(a)))
        .filter_map(|(rel, code)| {
            let hits: Vec<&&str> = words.iter().filter(|w| code.contains(**w)).collect();
            (!hits.is_empty()).then(|| format!("{rel}: {hits:?}"))
        })
        .collect()
}

#[test]
fn the_pure_cores_read_no_clock_spawn_nothing_and_do_no_io() {
    let forbidden = [
        "tokio::",
        "std::fs",
        "File::",
        "redb",
        "Instant::now()",
        "SystemTime::now()",
        "libp2p::Swarm",
        "spawn(",
        "std::thread",
    ];
    for file in [
        "download/core.rs",
        "download/scheduler.rs",
        "download/members.rs",
    ] {
        let (_, code) = node_sources()
            .into_iter()
            .find(|(rel, _)| rel == file)
            .unwrap_or_else(|| panic!("{file} is missing"));
        let hits: Vec<&&str> = forbidden.iter().filter(|w| code.contains(**w)).collect();
        assert!(hits.is_empty(), "{file} mentions {hits:?}");
    }
    // The simulator runs the cores in virtual time: it reads the clock once, to anchor it.
    for file in ["download/sim/mod.rs", "download/sim/world.rs"] {
        let (_, code) = node_sources()
            .into_iter()
            .find(|(rel, _)| rel == file)
            .unwrap_or_else(|| panic!("{file} is missing"));
        let hits: Vec<&&str> = forbidden[..]
            .iter()
            .filter(|w| **w != "Instant::now()" && code.contains(**w))
            .collect();
        assert!(hits.is_empty(), "{file} mentions {hits:?}");
        assert!(
            code.matches("Instant::now()").count() <= 1,
            "{file} reads the clock more than once"
        );
    }
}

#[test]
fn jobs_and_the_state_database_are_reached_by_message_not_by_lock() {
    // The registry's task owns the jobs; the state database's thread owns the database.
    let bad = offenders(
        &["Arc<StateStore>", "Mutex<JobRecord>", "Mutex<HashMap<JobId"],
        &[],
    );
    assert!(bad.is_empty(), "{bad:#?}");
    // Opened at start only, then handed to its thread.
    let bad = offenders(&["StateStore::open("], &["store/", "node/mod.rs"]);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn only_store_names_redb() {
    let bad = offenders(&["redb::", "use redb"], &["store/"]);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn only_swarm_knows_the_libp2p_swarm() {
    let bad = offenders(
        &[
            "NetworkBehaviour",
            "SwarmEvent",
            "SwarmBuilder",
            "libp2p::Swarm",
        ],
        &["swarm/"],
    );
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn only_the_daemon_and_its_clients_know_the_control_api() {
    // The clients: the `shoal` binary's commands, and the apt method (`apt/method.rs`).
    let bad = offenders(
        &["tonic", "control::"],
        &["daemon/", "bin/", "apt/method.rs"],
    );
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn only_the_binary_uses_anyhow() {
    let bad = offenders(&["anyhow"], &["bin/"]);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn the_job_types_are_a_leaf() {
    let (_, code) = node_sources()
        .into_iter()
        .find(|(rel, _)| rel == "job/mod.rs")
        .expect("job/mod.rs");
    assert!(
        !code.contains("crate::"),
        "job/mod.rs imports from the crate"
    );
}

/// The module a `crate::` path names: the longest prefix that is a module of `modules`.
fn module_of<'a>(path: &str, modules: &'a BTreeSet<String>) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .find_map(|n| modules.get(&parts[..n].join("/")))
}

/// The library's modules (files, a folder's `mod.rs` named by the folder) and the modules each
/// names through `crate::` paths (ancestors and itself left out).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let sources: Vec<(String, String)> = node_sources()
        .into_iter()
        .filter(|(rel, _)| !rel.starts_with("bin/") && rel != "lib.rs")
        .map(|(rel, code)| {
            let name = rel
                .trim_end_matches(".rs")
                .trim_end_matches("/mod")
                .to_owned();
            (name, code)
        })
        .collect();
    let modules: BTreeSet<String> = sources.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = BTreeMap::new();
    for (m, code) in &sources {
        let mut to = BTreeSet::new();
        let mut add = |path: &str| {
            if let Some(t) = module_of(path, &modules)
                && t != m
                && !m.starts_with(&format!("{t}/"))
            {
                to.insert(t.clone());
            }
        };
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, d::{e, f}}`: the first name of each top-level item.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            add(item.trim());
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 && c != '}' {
                        item.push(c);
                    }
                }
                add(item.trim());
            } else {
                let path: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                add(path.trim_end_matches(':'));
            }
        }
        graph.insert(m.clone(), to);
    }
    graph
}

#[test]
fn no_module_depends_on_itself_through_others() {
    let graph = module_graph();
    assert!(graph.contains_key("download/core") && graph.contains_key("store/state"));
    // Depth-first search for a back edge; the path to it is the cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_owned(), 1);
        path.push(m.to_owned());
        for t in graph.get(m).into_iter().flatten() {
            match state.get(t.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == t).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(t.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(t, graph, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(m.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if !state.contains_key(m.as_str())
            && let Some(cycle) = visit(m, &graph, &mut state, &mut Vec::new())
        {
            panic!("module cycle: {}", cycle.join(" -> "));
        }
    }
}

/// The longest functions of a file: (lines, name, first line), for functions at any
/// indentation whose body closes at the indentation it opened at.
fn function_lengths(rel: &str, code: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let words: Vec<&str> = trimmed.split_whitespace().collect();
        let Some(pos) = words.iter().position(|w| *w == "fn") else {
            continue;
        };
        // Only item starts: qualifiers before `fn`.
        if !words[..pos].iter().all(|w| {
            matches!(*w, "pub" | "async" | "unsafe" | "const" | "extern") || w.starts_with("pub(")
        }) {
            continue;
        }
        let name: String = words
            .get(pos + 1)
            .map(|w| {
                w.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect()
            })
            .unwrap_or_default();
        // The line that opens the body, then the line that closes it at the same indentation.
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue;
        }
        let close = (open + 1..lines.len()).find(|&j| {
            let l = lines[j];
            l.len() > indent
                && l[indent..].starts_with('}')
                && !l[..indent].contains(|c: char| !c.is_whitespace())
        });
        if let Some(close) = close {
            out.push((close - i + 1, format!("{rel}: {name}")));
        }
    }
    out
}

#[test]
fn no_function_in_node_is_longer_than_150_lines() {
    let mut long: Vec<(usize, String)> = node_sources()
        .iter()
        .filter(|(rel, _)| !rel.ends_with("daemon/control.rs"))
        .flat_map(|(rel, code)| function_lengths(rel, code))
        .filter(|(n, _)| *n > 150)
        .collect();
    long.sort();
    assert!(long.is_empty(), "functions over 150 lines: {long:?}");
    // The measure itself: a file's longest function is found.
    let sample = "fn a() {\n    x();\n    y();\n}\n";
    assert_eq!(
        function_lengths("s.rs", sample),
        vec![(4, "s.rs: a".into())]
    );
}
