#!/usr/bin/env python3
"""The layering rule of src/lib.rs, checked: dependencies run one way, down the `# Layout` list.

A module (a file `src/X.rs` or a folder `src/X/`) may use only modules listed below it, and within a
folder no two files may use each other, directly or through others (no cycle). Unit tests (the
`#[cfg(test)]` tail of a file, and `*_tests.rs` files) may use anything. Exits 1 naming every
violation.

    scripts/layers.py [SRC_DIR]
"""
import re
import sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "src")


def layout():
    """Module names in `# Layout` order, top first (`lib` for `Server`, this file)."""
    names, inside = [], False
    for line in (src / "lib.rs").read_text().splitlines():
        if line.startswith("//! # Layout"):
            inside = True
            continue
        if inside and not line.startswith("//!"):
            break
        m = re.match(r"//! - \[?`([a-z_A-Z]+)`", line)
        if inside and m:
            names.append("lib" if m.group(1) == "Server" else m.group(1))
    return names


def code(path):
    """A file's code without comments, strings, and its `#[cfg(test)]` tail."""
    text = path.read_text()
    cut = text.find("#[cfg(test)]\nmod tests")
    if cut < 0:
        cut = text.find("#[cfg(test)]\n#[path")
    if cut >= 0:
        text = text[:cut]
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def files(module):
    if module == "lib":
        return [src / "lib.rs"]
    folder = src / module
    if folder.is_dir():
        return sorted(p for p in folder.rglob("*.rs") if not p.name.endswith("_tests.rs"))
    return [src / f"{module}.rs"]


def used_modules(text):
    """The crate's top-level modules a text names (`crate::X`, and `use crate::{X, …}`)."""
    used = set(re.findall(r"\bcrate::([a-z_]+)", text))
    for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
        used.update(re.findall(r"\b([a-z_]+)\b", group))
    return used


def sibling_uses(path, siblings, text):
    """The files of the same folder a file names (`super::x`, `crate::<folder>::x`, `self::x` in mod.rs)."""
    folder = path.parent.name
    names = set(re.findall(r"\bsuper::([a-z_]+)", text))
    names |= set(re.findall(rf"\bcrate::{folder}::([a-z_]+)", text))
    for group in re.findall(r"\bsuper::\{([^}]*)\}", text):
        names.update(re.findall(r"\b([a-z_]+)\b", group))
    return {n for n in names if n in siblings and n != path.stem}


def cycles(graph):
    found, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def main():
    order = layout()
    rank = {m: i for i, m in enumerate(order)}
    modules = {p.stem for p in src.glob("*.rs") if not p.stem.endswith("_tests")}
    modules |= {p.name for p in src.iterdir() if p.is_dir()}
    problems = []
    for m in sorted(modules - {"main", "lib"} - set(order)):
        problems.append(f"src/{m}: not in lib.rs's # Layout")
    for module in order:
        for path in files(module):
            if not path.exists():
                problems.append(f"{path}: listed in # Layout but missing")
                continue
            for used in sorted(used_modules(code(path)) & set(order)):
                if used != module and rank[used] < rank[module]:
                    problems.append(f"{path}: uses {used}, which is above {module} in lib.rs's # Layout")
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        siblings = {p.stem for p in folder.glob("*.rs") if p.stem != "mod" and not p.stem.endswith("_tests")}
        graph = {
            p.stem: sibling_uses(p, siblings, code(p))
            for p in folder.glob("*.rs")
            if p.stem in siblings
        }
        for cycle in cycles(graph):
            problems.append(f"src/{folder.name}: files use each other: {' -> '.join(cycle)}")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"layers: {len(order)} modules in order, no module uses one above it, no file cycle")


main()
