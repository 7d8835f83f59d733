//! `docs/ARCHITECTURE.md` stays true to the tree: every source file it names exists, and every
//! source file of the workspace's crates is named in it (by its path or its file name).

// These tests read the repository's files: the purity rule of crdt/clippy.toml is for the core.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The crates' source folders, relative to the workspace root.
const SOURCE_DIRS: &[&str] = &[
    "crdt/src",
    "node/src",
    "sdk/canon/src",
    "sdk/rust/src",
    "sim/src",
    "bench/src",
    "examples/src",
    "fuzz/src",
    "fuzz/tests",
    "chaos/src",
];

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every `.rs` file under `dir`, as a path relative to the workspace root with `/` separators.
pub(crate) fn rust_files(root: &Path, dir: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name == "target") {
                continue;
            }
            rust_files(root, &path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let relative = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            found.push(relative);
        }
    }
}

/// The `.rs` names between backticks in `text` (`replica/round.rs`, `daemon.rs`).
fn named_files(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|quoted| {
            quoted.ends_with(".rs")
                && quoted.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        })
        .map(str::to_owned)
        .collect()
}

/// Whether `file` (a workspace path) is `name`, or ends with `/name`.
fn is_named(file: &str, name: &str) -> bool {
    file == name || file.ends_with(&format!("/{name}"))
}

#[test]
fn architecture_names_only_files_that_exist() {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    for dir in ["crdt", "node", "sdk", "sim", "bench", "examples", "fuzz", "chaos"] {
        rust_files(&root, &root.join(dir), &mut files);
    }
    let stale: Vec<String> =
        named_files(&text).into_iter().filter(|name| !files.iter().any(|file| is_named(file, name))).collect();
    assert!(stale.is_empty(), "docs/ARCHITECTURE.md names files that do not exist: {stale:?}");
}

#[test]
fn architecture_names_every_source_file() {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let named = named_files(&text);
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        rust_files(&root, &root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found only {} source files under {SOURCE_DIRS:?}", files.len());
    let missing: Vec<&String> = files.iter().filter(|file| !named.iter().any(|name| is_named(file, name))).collect();
    assert!(
        missing.is_empty(),
        "source files docs/ARCHITECTURE.md does not name (add a line to its code map): {missing:?}"
    );
}

#[test]
fn named_files_reads_backticked_paths_only() {
    let text = "see `replica/round.rs` and `daemon.rs`, not `Replica::round` or round.rs";
    let expected: BTreeSet<String> = ["daemon.rs", "replica/round.rs"].map(str::to_owned).into();
    assert_eq!(named_files(text), expected);
    assert!(is_named("crdt/src/replica/round.rs", "replica/round.rs"));
    assert!(!is_named("crdt/src/replica/around.rs", "round.rs"));
}

/// The crates whose bounds an operator meets (the simulator's and the bench's are their own).
const LIMIT_DIRS: &[&str] = &["crdt/src", "node/src", "sdk/rust/src"];

/// The names of the `*_MAX` constants defined in `text` (`const NAME_MAX: ...`, any visibility).
fn max_constants(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.trim_start().split_once("const ").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once(':').map(|(name, _)| name.trim()))
        .filter(|name| {
            name.ends_with("_MAX") && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

/// Issue 12: every bound has a row in docs/operations.md's limits tables, so what an operator
/// reads is what the code enforces.
#[test]
fn every_max_constant_is_in_the_limits_tables() {
    let root = workspace_root();
    let operations = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let limits = operations.split_once("## Limits").map(|(_, rest)| rest).unwrap_or_default();
    let limits = limits.split_once("\n## ").map_or(limits, |(section, _)| section);
    let mut files = Vec::new();
    for dir in LIMIT_DIRS {
        rust_files(&root, &root.join(dir), &mut files);
    }
    let mut constants = BTreeSet::new();
    for file in &files {
        constants.extend(max_constants(&std::fs::read_to_string(root.join(file)).unwrap()));
    }
    assert!(constants.len() > 30, "found only {} bounds", constants.len());
    let missing: Vec<&String> = constants.iter().filter(|name| !limits.contains(&format!("`{name}`"))).collect();
    assert!(missing.is_empty(), "bounds missing from the limits tables of docs/operations.md: {missing:?}");
}

#[test]
fn max_constants_reads_definitions_only() {
    let text = "pub const A_MAX: usize = 1;\n    const B_MAX: u64 = 2; // x\nlet c = A_MAX;\npub(crate) const C_MAX: u8 = 3;\nconst D_MIN: u8 = 0;";
    let expected: BTreeSet<String> = ["A_MAX", "B_MAX", "C_MAX"].map(str::to_owned).into();
    assert_eq!(max_constants(text), expected);
}
