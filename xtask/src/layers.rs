//! `cargo xtask layers`: no module imports another that imports it back, directly or through
//! others, in any crate (issue 20). cargo-modules draws each crate's `use` edges between
//! modules; a cycle among them fails the check, naming its modules and edges.
//!
//! cargo-modules' own `--acyclic` is not used: in 0.27 it checks the whole item graph before
//! the filters apply, so a method that names its own type counts as a cycle. The graph it
//! prints with the filters on holds only modules, and its strongly connected components are
//! the cycles. Like any `use`-based view it does not see a path written inline
//! (`super::x::f()`); a code review still has to.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use anyhow::bail;

use crate::cmd::output;

/// Every crate's module tree that must be acyclic: (what it is, the directory cargo-modules
/// runs in, its selection). The kernel crate is read from its own directory, on its own
/// (nightly) toolchain.
const CRATES: &[(&str, &str, &[&str])] = &[
    ("brokerscope lib", ".", &["-p", "brokerscope", "--lib"]),
    (
        "brokerscope bin",
        ".",
        &["-p", "brokerscope", "--bin", "brokerscope"],
    ),
    (
        "brokerscope-common",
        ".",
        &["-p", "brokerscope-common", "--lib"],
    ),
    (
        "brokerscope-tests",
        ".",
        &["-p", "brokerscope-tests", "--lib"],
    ),
    ("xtask", ".", &["-p", "xtask", "--bin", "xtask"]),
    (
        "brokerscope-ebpf",
        "agent-ebpf",
        &["-p", "brokerscope-ebpf", "--bin", "brokerscope-ebpf"],
    ),
];

/// Modules only, joined by `use` edges.
const FILTERS: &[&str] = &[
    "--no-externs",
    "--no-sysroot",
    "--no-fns",
    "--no-types",
    "--no-traits",
    "--no-owns",
];

pub fn check(root: &Path) -> anyhow::Result<()> {
    crate::setup::cargo_modules()?;
    let mut failed = Vec::new();
    for (name, dir, selection) in CRATES {
        let dot = output(
            Command::new("cargo")
                .current_dir(root.join(dir))
                .args(["modules", "dependencies"])
                .args(*selection)
                .args(FILTERS),
        )?;
        let found = cycles(&dot);
        if found.is_empty() {
            println!("layers: {name}: no module cycle");
            continue;
        }
        for cycle in found {
            println!("layers: {name}: cycle:");
            for (from, to) in cycle {
                println!("    {from} -> {to}");
            }
        }
        failed.push(*name);
    }
    if !failed.is_empty() {
        bail!(
            "module cycles in {}: move what both sides use into a module below them",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The cycles of a cargo-modules graph (dot): each strongly connected component of its `uses`
/// edges with more than one module, as its edges, sorted.
pub fn cycles(dot: &str) -> Vec<Vec<(String, String)>> {
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for line in dot.lines() {
        let Some((from, rest)) = line.trim().split_once(" -> ") else {
            continue;
        };
        if !rest.contains("label=\"uses\"") {
            continue;
        }
        let (Some(from), Some(to)) = (quoted(from), quoted(rest)) else {
            continue;
        };
        if from != to {
            edges.entry(from).or_default().insert(to);
            edges.entry(to).or_default();
        }
    }
    let mut found: Vec<Vec<(String, String)>> = components(&edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|members| {
            members
                .iter()
                .flat_map(|from| {
                    edges[from]
                        .iter()
                        .filter(|to| members.contains(*to))
                        .map(|to| (from.to_string(), to.to_string()))
                })
                .collect()
        })
        .collect();
    found.sort();
    found
}

/// The first `"..."` of `s`.
fn quoted(s: &str) -> Option<&str> {
    let start = s.find('"')? + 1;
    let len = s[start..].find('"')?;
    Some(&s[start..start + len])
}

/// Strongly connected components (Kosaraju: finish order on the graph, then reachability on
/// its reverse), iterative so a deep module tree cannot overflow the stack.
fn components<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<BTreeSet<&'a str>> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for &start in edges.keys() {
        if !seen.insert(start) {
            continue;
        }
        let mut stack = vec![(start, edges[start].iter())];
        while let Some((node, next)) = stack.last_mut() {
            match next.next() {
                Some(&to) => {
                    if seen.insert(to) {
                        stack.push((to, edges[to].iter()));
                    }
                }
                None => {
                    order.push(*node);
                    stack.pop();
                }
            }
        }
    }
    let mut reverse: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (&from, tos) in edges {
        for &to in tos {
            reverse.entry(to).or_default().push(from);
        }
    }
    let mut assigned = BTreeSet::new();
    let mut out = Vec::new();
    for &start in order.iter().rev() {
        if !assigned.insert(start) {
            continue;
        }
        let mut component = BTreeSet::from([start]);
        let mut todo = vec![start];
        while let Some(node) = todo.pop() {
            for &from in reverse.get(node).into_iter().flatten() {
                if assigned.insert(from) {
                    component.insert(from);
                    todo.push(from);
                }
            }
        }
        out.push(component);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses(from: &str, to: &str) -> String {
        format!(
            "    \"{from}\" -> \"{to}\" [label=\"uses\", color=\"#7f7f7f\", style=\"dashed\"] [constraint=false]; // \"uses\" edge\n"
        )
    }

    #[test]
    fn a_graph_that_flows_one_way_has_no_cycle() {
        let dot = [uses("c", "c::a"), uses("c::a", "c::b"), uses("c", "c::b")].concat();
        assert!(cycles(&dot).is_empty());
    }

    #[test]
    fn cycles_are_named_by_their_edges() {
        let dot = [
            "digraph {\n    \"c\" [label=\"crate|c\"]; // \"crate\" node\n".to_string(),
            uses("c::a", "c::b"),
            uses("c::b", "c::c"),
            uses("c::c", "c::a"),
            uses("c::c", "c::d"),
            uses("c::x", "c::y"),
            uses("c::y", "c::x"),
            // Owns edges and self edges are not imports.
            "    \"c::d\" -> \"c::a\" [label=\"owns\"];\n".to_string(),
            uses("c::d", "c::d"),
            "}\n".to_string(),
        ]
        .concat();
        assert_eq!(
            cycles(&dot),
            vec![
                vec![
                    ("c::a".to_string(), "c::b".to_string()),
                    ("c::b".to_string(), "c::c".to_string()),
                    ("c::c".to_string(), "c::a".to_string()),
                ],
                vec![
                    ("c::x".to_string(), "c::y".to_string()),
                    ("c::y".to_string(), "c::x".to_string()),
                ],
            ]
        );
    }
}
