//! No import circles (issue 12): in every crate, the modules of one folder use each other in
//! one direction only, so each reads (and tests) without the ones that use it. A module that
//! names `crate::b::..` or `super::b::..` depends on `b`; a dependency between two files
//! counts between their ancestors that are siblings (`replica/round.rs` naming `crate::error`
//! makes `replica` depend on `error`). A parent and its own children are not a circle: a
//! folder's `mod.rs` holds what its files share. Names re-exported at the crate root count as
//! the root's, so they never make a circle; comments and string literals are not read.

// These tests read the repository's files: the purity rule of crdt/clippy.toml is for the core.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::architecture::{rust_files, workspace_root};

/// Each crate's source folder, relative to the workspace root.
const CRATE_DIRS: &[&str] =
    &["crdt/src", "node/src", "sdk/rust/src", "sim/src", "bench/src", "examples/src", "fuzz/src", "chaos/src"];

/// A module: the path of names from the crate root (`["replica", "round"]`; the root is empty).
type Module = Vec<String>;

/// A dependency between sibling modules, with the first place that makes it (`file:line`).
type Edges = BTreeMap<(Module, Module), String>;

/// The module a source file defines, relative to its crate's folder (`replica/mod.rs` is
/// `replica`); `None` for a separate crate root in the same folder (`main.rs` beside `lib.rs`,
/// `bin/*.rs`), whose `crate::` is another crate.
fn module_of(relative: &str, has_lib: bool) -> Option<Module> {
    if relative.starts_with("bin/") || (relative == "main.rs" && has_lib) {
        return None;
    }
    if relative == "lib.rs" || relative == "main.rs" {
        return Some(Vec::new());
    }
    let mut names: Module = relative.trim_end_matches(".rs").split('/').map(str::to_owned).collect();
    if names.last().is_some_and(|last| last == "mod") {
        names.pop();
    }
    Some(names)
}

/// `text` with comments blanked and string and char literals emptied (newlines kept, so line
/// numbers stay right): a path named in a doc comment or a message is no dependency.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    // Skips to the end of a quoted literal opened at `i` (`"`), keeping its newlines.
    let skip_quoted = |mut i: usize, raw: bool, hashes: usize, out: &mut String| -> usize {
        i += 1;
        while i < chars.len() {
            match chars[i] {
                '\\' if !raw => i += 1,
                '\n' => out.push('\n'),
                '"' if chars[i + 1..].iter().take(hashes).filter(|c| **c == '#').count() == hashes => {
                    return i + 1 + hashes;
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['/', '/']) {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i..].starts_with(&['/', '*']) {
                    depth += 1;
                    i += 2;
                } else if chars[i..].starts_with(&['*', '/']) {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if rest[0] == 'r' && rest.get(1).is_some_and(|c| *c == '"' || *c == '#') {
            let hashes = rest[1..].iter().take_while(|c| **c == '#').count();
            if rest.get(1 + hashes) == Some(&'"') {
                out.push_str("\"\"");
                i = skip_quoted(i + 1 + hashes, true, hashes, &mut out);
            } else {
                out.push('r');
                i += 1;
            }
        } else if rest[0] == '"' {
            out.push_str("\"\"");
            i = skip_quoted(i, false, 0, &mut out);
        } else if rest[0] == '\'' && rest.get(1) == Some(&'\\') {
            // An escaped char literal: '\n', '\'', '\u{..}'.
            i += 3;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            out.push_str("' '");
            i += 1;
        } else if rest[0] == '\'' && rest.get(2) == Some(&'\'') {
            out.push_str("' '");
            i += 3;
        } else {
            // Anything else, lifetimes ('a) included.
            out.push(rest[0]);
            i += 1;
        }
    }
    out
}

/// A token of code: a word or one punctuation mark (`::` is one), with its line.
fn tokens(code: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let mut line = 1;
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let mut word = c.to_string();
            while let Some(&next) = chars.peek().filter(|next| next.is_alphanumeric() || **next == '_') {
                word.push(next);
                chars.next();
            }
            found.push((word, line));
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            found.push(("::".to_owned(), line));
        } else if !c.is_whitespace() {
            found.push((c.to_string(), line));
        }
    }
    found
}

/// Reads the path (or `use` tree) starting at `tokens[at]`, after `prefix`; every full path it
/// names goes to `paths`. Returns the index after it.
fn read_path(tokens: &[(String, usize)], mut at: usize, prefix: &[String], paths: &mut Vec<Vec<String>>) -> usize {
    let mut names = prefix.to_vec();
    loop {
        match tokens.get(at).map(|(token, _)| token.as_str()) {
            Some("{") => {
                at += 1;
                while let Some((token, _)) = tokens.get(at) {
                    match token.as_str() {
                        "}" => return at + 1,
                        "," => at += 1,
                        _ => at = read_path(tokens, at, &names, paths),
                    }
                }
                return at;
            }
            Some("*") => {
                paths.push(names);
                return at + 1;
            }
            Some(word) if word.starts_with(|c: char| c.is_alphanumeric() || c == '_') => {
                match word {
                    "super" => {
                        names.pop();
                    }
                    "self" => {}
                    _ => names.push(word.to_owned()),
                }
                at += 1;
                if tokens.get(at).is_some_and(|(token, _)| token == "::") {
                    at += 1;
                    continue;
                }
                paths.push(names);
                return at;
            }
            _ => {
                paths.push(names);
                return at;
            }
        }
    }
}

/// The dependencies between sibling modules of one crate, given each module's source text.
fn sibling_edges(sources: &BTreeMap<Module, (String, String)>) -> Edges {
    let mut edges = Edges::new();
    for (module, (file, text)) in sources {
        let tokens = tokens(&code_only(text));
        // Inline modules (`mod tests { .. }`) open at a brace depth: `super` starts from them.
        let mut inline: Vec<(String, usize)> = Vec::new();
        let mut depth: usize = 0;
        let mut at = 0;
        while at < tokens.len() {
            let token = tokens[at].0.as_str();
            let path_start = matches!(token, "crate" | "super" | "self")
                && tokens.get(at + 1).is_some_and(|(next, _)| next == "::")
                && (at == 0 || tokens[at - 1].0 != "::");
            if path_start {
                let mut here = module.clone();
                here.extend(inline.iter().map(|(name, _)| name.clone()));
                let start: Module = if token == "crate" { Vec::new() } else { here };
                let line = tokens[at].1;
                let from = if token == "crate" { at + 2 } else { at };
                let mut paths = Vec::new();
                at = read_path(&tokens, from, &start, &mut paths);
                for path in paths {
                    if let Some(edge) = sibling_edge(module, &resolve(sources, &path)) {
                        edges.entry(edge).or_insert_with(|| format!("{file}:{line}"));
                    }
                }
                continue;
            }
            match token {
                "{" => depth += 1,
                "}" => {
                    let line = tokens[at].1;
                    depth = depth.checked_sub(1).unwrap_or_else(|| panic!("{file}:{line}: this brace closes nothing"));
                    inline.retain(|(_, opened)| *opened <= depth);
                }
                "mod" if tokens.get(at + 2).is_some_and(|(brace, _)| brace == "{") => {
                    depth += 1;
                    inline.push((tokens[at + 1].0.clone(), depth));
                    at += 3;
                    continue;
                }
                _ => {}
            }
            at += 1;
        }
    }
    edges
}

/// The longest start of `path` that is a module of the crate (the root at least).
fn resolve(sources: &BTreeMap<Module, (String, String)>, path: &[String]) -> Module {
    (0..=path.len())
        .rev()
        .map(|length| path[..length].to_vec())
        .find(|prefix| sources.contains_key(prefix))
        .unwrap_or_default()
}

/// The edge between the sibling ancestors of `from` and `to`; `None` when one contains the
/// other (a module and its parent, or itself).
fn sibling_edge(from: &Module, to: &Module) -> Option<(Module, Module)> {
    let shared = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if shared == from.len() || shared == to.len() {
        return None;
    }
    Some((from[..=shared].to_vec(), to[..=shared].to_vec()))
}

/// The circles among `edges`: each strongly connected set of two or more modules, sorted.
fn circles(edges: &Edges) -> Vec<Vec<Module>> {
    let mut next: BTreeMap<&Module, Vec<&Module>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
    }
    // Two modules are in one circle when each reaches the other.
    let reach = |start: &Module| -> BTreeSet<Module> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.clone()];
        while let Some(module) = stack.pop() {
            for target in next.get(&module).into_iter().flatten() {
                if seen.insert((*target).clone()) {
                    stack.push((*target).clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&Module, BTreeSet<Module>> = next.keys().map(|module| (*module, reach(module))).collect();
    let mut found: BTreeSet<Vec<Module>> = BTreeSet::new();
    for (module, reached) in &reaches {
        if !reached.contains(*module) {
            continue;
        }
        let circle: Vec<Module> = reached
            .iter()
            .filter(|other| reaches.get(other).is_some_and(|back| back.contains(*module)))
            .cloned()
            .collect();
        found.insert(circle);
    }
    found.into_iter().collect()
}

fn module_name(module: &Module) -> String {
    if module.is_empty() { "crate".to_owned() } else { module.join("::") }
}

/// The circles of one crate, each with the places that make it, as a reader wants them.
fn crate_circles(sources: &BTreeMap<Module, (String, String)>) -> Vec<String> {
    let edges = sibling_edges(sources);
    circles(&edges)
        .into_iter()
        .map(|circle| {
            let places: Vec<String> = edges
                .iter()
                .filter(|((from, to), _)| circle.contains(from) && circle.contains(to))
                .map(|((from, to), place)| format!("{} -> {} ({place})", module_name(from), module_name(to)))
                .collect();
            places.join(", ")
        })
        .collect()
}

/// Every module of the crate in `dir` (relative to `root`), with its file and text.
fn crate_sources(root: &Path, dir: &str) -> BTreeMap<Module, (String, String)> {
    let mut files = Vec::new();
    rust_files(root, &root.join(dir), &mut files);
    let has_lib = files.iter().any(|file| *file == format!("{dir}/lib.rs"));
    files
        .into_iter()
        .filter_map(|file| {
            let relative = file.strip_prefix(&format!("{dir}/"))?.to_owned();
            let module = module_of(&relative, has_lib)?;
            let text = std::fs::read_to_string(root.join(&file)).unwrap();
            Some((module, (file, text)))
        })
        .collect()
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() {
    let root = workspace_root();
    let mut found = Vec::new();
    let mut modules = 0;
    for dir in CRATE_DIRS {
        let sources = crate_sources(&root, dir);
        modules += sources.len();
        found.extend(crate_circles(&sources).into_iter().map(|circle| format!("{dir}: {circle}")));
    }
    assert!(modules > 60, "read only {modules} modules of {CRATE_DIRS:?}");
    assert!(
        found.is_empty(),
        "modules that use each other in a circle (move what both need to a module of its own):\n  {}",
        found.join("\n  ")
    );
}

/// A crate from `(file, text)` pairs, for the tests of the reader itself.
fn crate_of(files: &[(&str, &str)]) -> BTreeMap<Module, (String, String)> {
    files
        .iter()
        .map(|(file, text)| (module_of(file, true).unwrap(), ((*file).to_owned(), (*text).to_owned())))
        .collect()
}

#[test]
fn a_circle_between_two_files_is_found_with_its_places() {
    let sources = crate_of(&[
        ("lib.rs", "mod a; mod b;"),
        ("a.rs", "use crate::b::Thing;\n"),
        ("b.rs", "fn f() {}\n\nfn g() -> crate::a::Other { todo!() }"),
    ]);
    assert_eq!(crate_circles(&sources), ["a -> b (a.rs:1), b -> a (b.rs:3)"]);
}

#[test]
fn a_circle_through_folders_nested_use_trees_and_super_is_found() {
    let sources = crate_of(&[
        ("lib.rs", "mod x; mod y; mod z;"),
        ("x/mod.rs", "mod inner;"),
        ("x/inner.rs", "use crate::{z::{self, Z}, y::*, y as _};"),
        ("y.rs", ""),
        ("z.rs", "mod tests { fn t() { super::super::x::inner::f(); } }"),
    ]);
    let found = crate_circles(&sources);
    assert_eq!(found, ["x -> z (x/inner.rs:1), z -> x (z.rs:1)"]);
}

#[test]
fn parents_and_children_comments_and_strings_make_no_circle() {
    let sources = crate_of(&[
        ("lib.rs", "mod replica; mod error; pub use replica::Replica;"),
        ("replica/mod.rs", "mod round; use round::Round; use crate::error::E;"),
        ("replica/round.rs", "use super::Replica; use crate::Replica as R;"),
        // A doc link, a comment and a message name `replica` without using it.
        ("error.rs", "//! See [`crate::replica`].\n/* crate::replica */ const M: &str = \"crate::replica::x\";"),
    ]);
    assert!(crate_circles(&sources).is_empty(), "{:?}", crate_circles(&sources));
    assert_eq!(
        sibling_edges(&sources).into_keys().collect::<Vec<_>>(),
        [(vec!["replica".into()], vec!["error".into()])]
    );
}

#[test]
fn code_only_keeps_lines_and_lifetimes_and_drops_literals() {
    let text = "let a = '\"'; fn f<'a>(x: &'a str) {}\nlet s = r#\"crate::x\n\"#; // crate::y\nlet c = '\\'';";
    let code = code_only(text);
    assert_eq!(code.lines().count(), text.lines().count(), "{code}");
    assert!(!code.contains("crate::"), "{code}");
    assert!(code.contains("&'a str"), "{code}");
}
