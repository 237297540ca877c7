//! Keeps the shape of `src/` from silently decaying: reads every module's
//! `use crate::…`, `use super::…` and inline `crate::…` paths (tests and
//! comments left out) and fails on an import cycle between modules, on a
//! source that imports a backend or the reverse, on a Dragonflow API that
//! imports a backend, on config importing anything that runs, and on a
//! database connection opened outside `src/db/`; and on an import cycle in
//! either binary (`src/main.rs` with `src/cli/`, `src/bin/feedbridge-bench/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file of one crate of the package, by module path: its root
/// file is `crate`, `DIR/a/mod.rs` is `a`, `DIR/a/b.rs` is `a::b`; files
/// for which `skip` holds (another crate's) are left out.
fn modules_of(root: &str, dir: &str, skip: impl Fn(&str) -> bool) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = manifest.join(dir);
    let mut files = Vec::new();
    walk(&dir, &mut files);
    let mut out = BTreeMap::new();
    out.insert("crate".to_owned(), manifest.join(root));
    for file in files {
        let rel = file
            .strip_prefix(&dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if skip(&rel) || manifest.join(root) == file {
            continue;
        }
        let name = rel
            .trim_end_matches(".rs")
            .trim_end_matches("/mod")
            .replace('/', "::");
        out.insert(name, file);
    }
    out
}

/// The library's modules (`src/`, less the binaries' files).
fn modules() -> BTreeMap<String, PathBuf> {
    modules_of("src/lib.rs", "src", |rel| {
        rel == "main.rs" || rel.starts_with("bin/") || rel.starts_with("cli/")
    })
}

/// Each binary's modules: `feedbridge` (`src/main.rs` and `src/cli/`) and
/// `feedbridge-bench` (`src/bin/feedbridge-bench/`).
fn binaries() -> Vec<(&'static str, BTreeMap<String, PathBuf>)> {
    vec![
        (
            "feedbridge",
            modules_of("src/main.rs", "src/cli", |_| false),
        ),
        (
            "feedbridge-bench",
            modules_of(
                "src/bin/feedbridge-bench/main.rs",
                "src/bin/feedbridge-bench",
                |_| false,
            ),
        ),
    ]
}

/// The code of a file without comments and without `#[cfg(test)]` items.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    // Drop each `#[cfg(test)]` item: the attribute, then up to the end of
    // the braces it opens.
    while let Some(start) = out.find("#[cfg(test)]") {
        let Some(open) = out[start..].find('{').map(|i| start + i) else {
            break;
        };
        let mut depth = 0;
        let mut end = out.len();
        for (i, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(start..end, "");
    }
    out
}

/// The module paths `module`'s code refers to.
fn references(module: &str, code: &str) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    // `use` statements, groups expanded: `use crate::{a, b::{c, d}};`
    for statement in code.split(';') {
        let Some(i) = statement.find("use ") else {
            continue;
        };
        let tree: String = statement[i + 4..]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        expand("", &tree, &mut paths);
    }
    // inline paths: `crate::a::b::f(…)`
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        paths.insert(tail[..end].to_owned());
        rest = &tail[7..];
    }
    // paths through a child module declared here (`mod zmq;` … `zmq::X`)
    for child in code
        .split(';')
        .filter_map(|s| {
            s.trim()
                .strip_prefix("pub mod ")
                .or(s.trim().strip_prefix("mod "))
        })
        .filter(|c| c.chars().all(|ch| ch.is_alphanumeric() || ch == '_'))
    {
        let needle = format!("{child}::");
        let used = code.match_indices(&needle).any(|(i, _)| {
            !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
        });
        if used {
            paths.insert(if module == "crate" {
                format!("crate::{child}")
            } else {
                format!("crate::{module}::{child}")
            });
        }
    }
    let parent = module.rsplit_once("::").map(|(p, _)| p).unwrap_or("crate");
    paths
        .into_iter()
        .filter_map(|p| {
            if let Some(rest) = p.strip_prefix("crate::") {
                Some(rest.to_owned()).filter(|r| !r.is_empty())
            } else if let Some(rest) = p.strip_prefix("super::") {
                Some(if parent == "crate" {
                    rest.to_owned()
                } else {
                    format!("{parent}::{rest}")
                })
            } else {
                p.strip_prefix("self::")
                    .map(|rest| format!("{module}::{rest}"))
            }
        })
        .collect()
}

/// Expands a use tree (`a::{b, c::d}`) into full paths.
fn expand(prefix: &str, tree: &str, out: &mut BTreeSet<String>) {
    match tree.find('{') {
        None => {
            out.insert(format!("{prefix}{tree}"));
        }
        Some(open) => {
            let head = &tree[..open];
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&format!("{prefix}{head}"), &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            if start < inner.len() {
                expand(&format!("{prefix}{head}"), &inner[start..], out);
            }
        }
    }
}

/// The library's module graph.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    graph_of(&modules())
}

/// A crate's module graph: module → the modules it imports (the longest
/// known module prefix of each path; never itself).
fn graph_of(modules: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (name, file) in modules {
        let code = code(&std::fs::read_to_string(file).unwrap());
        let mut targets = BTreeSet::new();
        for path in references(name, &code) {
            let parts: Vec<&str> = path.split("::").collect();
            let target = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|m| modules.contains_key(m));
            if let Some(t) = target.filter(|t| t != name) {
                targets.insert(t);
            }
        }
        graph.insert(name.clone(), targets);
    }
    graph
}

/// One cycle of the graph, if there is any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str()) {
            if let Some(c) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn under(module: &str, root: &str) -> bool {
    module == root || module.starts_with(&format!("{root}::"))
}

#[test]
fn the_parser_sees_groups_super_and_inline_paths() {
    let code = code(
        "mod k;\nuse crate::{a, b::{c, d}};\nuse super::x::Y;\n// crate::comment\nfn f() { crate::e::g(); k::h(); }\n#[cfg(test)]\nmod tests { use crate::t; }\n",
    );
    let refs = references("p::q", &code);
    let want: BTreeSet<String> = ["a", "b::c", "b::d", "e::g", "p::q::k", "p::x::Y"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
    let cyclic: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert!(find_cycle(&cyclic).is_some());
}

#[test]
fn no_import_cycle_between_modules() {
    let graph = graph();
    assert!(graph.len() > 20, "the walk found the modules: {graph:?}");
    for (module, targets) in &graph {
        eprintln!("{module} -> {targets:?}");
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn no_import_cycle_in_the_binaries() {
    for (binary, modules) in binaries() {
        let graph = graph_of(&modules);
        assert!(
            graph.len() > 3,
            "the walk found {binary}'s modules: {graph:?}"
        );
        if let Some(cycle) = find_cycle(&graph) {
            panic!("import cycle in {binary}: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn components_import_only_what_their_layer_allows() {
    let graph = graph();
    let mut broken = Vec::new();
    for (module, targets) in &graph {
        for target in targets {
            let rule = if under(module, "source") && under(target, "backend") {
                Some("a source imports a backend")
            } else if under(module, "backend") && under(target, "source") {
                Some("a backend imports a source")
            } else if under(module, "pubsub") && under(target, "backend") {
                Some("the Dragonflow API imports a backend")
            } else if under(module, "config")
                && !["config", "codec", "keymap", "update"]
                    .iter()
                    .any(|pure| under(target, pure))
            {
                Some("config imports something that runs")
            } else if ["update", "codec", "keymap", "mapper"].contains(&module.as_str())
                && !["update", "codec", "keymap", "mapper"].contains(&target.as_str())
            {
                Some("the pure core imports something that runs")
            } else {
                None
            };
            if let Some(rule) = rule {
                broken.push(format!("{module} -> {target}: {rule}"));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn databases_are_connected_only_in_src_db() {
    let openers = [
        "Client::connect(",
        "redis::Client::open(",
        "Client::build_with_tls(",
        "get_multiplexed_async_connection(",
    ];
    let mut found = Vec::new();
    for (module, file) in modules() {
        if under(&module, "db") || module == "testing" {
            continue;
        }
        let code = code(&std::fs::read_to_string(&file).unwrap());
        for opener in openers {
            if code.contains(opener) {
                found.push(format!("{module}: {opener}"));
            }
        }
    }
    assert!(found.is_empty(), "connect through crate::db: {found:?}");
}
