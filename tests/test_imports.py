"""The package's import structure: no circles, the core never imports the callbacks, every room is a package.

Reads the source with `ast` (nothing is imported): every `import` and `from ... import` naming a fluxlora module,
also those inside functions (a lazy import hides a circle, it does not remove it). `callbacks/` is the package
`fluxlora.callbacks` (pyproject.toml's package-dir); the `fluxlora/callbacks` and `fluxlora/conf` symlinks are skipped.

Draw the structure (the rooms and the imports between them)::

    python tests/test_imports.py --dot       # room level: run -> training, ... (DOT text)
    python tests/test_imports.py --modules   # module level, one edge a line
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fluxlora": ROOT / "fluxlora", "fluxlora.callbacks": ROOT / "callbacks"}
"""Package name -> its directory (as pyproject.toml's package-dir maps it)."""
CALLBACKS = "fluxlora.callbacks"
OUTSIDE_CORE = (CALLBACKS, "fluxlora.__main__")
"""The core is everything under fluxlora/ but these (and what lies below them): they may import the core, not the
reverse."""


@dataclass(frozen=True)
class Import:
    """One import statement of `source` naming the fluxlora module `target`."""

    source: str
    target: str
    path: Path
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}{' (inside a function)' if self.lazy else ''}"


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package's name -> its __init__.py)."""
    files: dict[str, Path] = {}
    for package, top in SOURCES.items():
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(top)
            if any(p.is_symlink() for p in _dirs_between(top, path)) or "__pycache__" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def _dirs_between(top: Path, path: Path) -> list[Path]:
    out, d = [], path.parent
    while d != top and top in d.parents:
        out.append(d)
        d = d.parent
    return out


def _functions(tree: ast.AST) -> set[int]:
    """ids of the import nodes that lie inside a function."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def imports(files: dict[str, Path] | None = None) -> list[Import]:
    """Every import of a fluxlora module in the package's source, resolved to the module it loads:
    `from fluxlora.x import name` is `fluxlora.x.name` when that is a module, else `fluxlora.x`."""
    files = module_files() if files is None else files
    found = []
    for source, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        lazy = _functions(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    pkg = source.split(".") if is_package else source.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in dict.fromkeys(targets):
                if t == "fluxlora" or t.startswith("fluxlora."):
                    found.append(Import(source, _known(t, files), path, node.lineno, id(node) in lazy))
    return found


def _known(name: str, files: dict[str, Path]) -> str:
    """`name`, or its longest prefix that is a module (`import fluxlora.x.y.attr` is not valid, but be safe)."""
    parts = name.split(".")
    while len(parts) > 1 and ".".join(parts) not in files:
        parts.pop()
    return ".".join(parts)


def graph(found: list[Import]) -> dict[str, dict[str, list[Import]]]:
    """source -> target -> the statements behind the edge."""
    g: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for imp in found:
        g[imp.source][imp.target].append(imp)
    return g


def strongly_connected(nodes: list[str], g: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Tarjan's components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(g.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    comps.append(sorted(comp))
    return comps


def _path(g: dict[str, dict[str, list[Import]]], start: str, goal: str, within: set[str]) -> list[str]:
    """A shortest chain start -> ... -> goal inside `within` (breadth first)."""
    prev: dict[str, str | None] = {start: None}
    todo = deque([start])
    while todo:
        v = todo.popleft()
        if v == goal:
            break
        for w in sorted(g.get(v, {})):
            if w in within and w not in prev:
                prev[w] = v
                todo.append(w)
    chain: list[str] = []
    node: str | None = goal
    while node is not None:
        chain.append(node)
        node = prev[node]
    return chain[::-1]


def cycles(g: dict[str, dict[str, list[Import]]], nodes: list[str]) -> list[list[str]]:
    """Circles of imports, each as a chain a -> b -> ... -> a: for every component of more than one module, enough
    shortest circles to cover each of its edges; every self-import."""
    out = []
    for comp in strongly_connected(nodes, g):
        members = set(comp)
        if len(comp) == 1:
            if comp[0] in g.get(comp[0], {}):
                out.append([comp[0], comp[0]])
            continue
        covered: set[tuple[str, str]] = set()
        for u in comp:
            for v in sorted(g.get(u, {})):
                if v not in members or (u, v) in covered:
                    continue
                chain = [u, *_path(g, v, u, members)] if v != u else [u, u]
                covered.update(zip(chain, chain[1:]))
                out.append(chain)
    return out


def describe_cycle(chain: list[str], g: dict[str, dict[str, list[Import]]]) -> str:
    lines = [" -> ".join(chain)]
    for a, b in zip(chain, chain[1:]):
        lines += [f"    {a} -> {b}: {imp.where()}" for imp in g[a][b]]
    return "\n".join(lines)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def room(module: str) -> str:
    """The room a module lives in: its subpackage (run, training, ..., callbacks), `root` for the modules at the top
    of fluxlora/, `__main__` for the entry point."""
    parts = module.split(".")
    if module == "fluxlora.__main__":
        return "__main__"
    if _in(module, CALLBACKS):
        return "callbacks"
    if len(parts) >= 2 and (ROOT / "fluxlora" / parts[1]).is_dir():
        return parts[1]
    return "root"


def room_edges(found: list[Import]) -> dict[tuple[str, str], int]:
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for imp in found:
        a, b = room(imp.source), room(imp.target)
        if a != b:
            edges[a, b] += 1
    return dict(sorted(edges.items()))


def dot(found: list[Import]) -> str:
    """The room-level graph as DOT text: one `a -> b` line per pair of rooms, with the number of imports; edges
    inside a circle of rooms are marked."""
    edges = room_edges(found)
    rooms = sorted({r for e in edges for r in e})
    rg = {r: {b: [] for (a, b) in edges if a == r} for r in rooms}
    in_circle = {(a, b) for comp in strongly_connected(rooms, rg) if len(comp) > 1
                 for a in comp for b in comp if (a, b) in edges}
    lines = ["digraph fluxlora {"]
    for (a, b), n in edges.items():
        mark = "  // circle" if (a, b) in in_circle else ""
        lines.append(f'  "{a}" -> "{b}";  // {n} import{"s" if n != 1 else ""}{mark}')
    lines.append("}")
    return "\n".join(lines)


# ---- tests ----

def test_no_import_cycles():
    files = module_files()
    found = imports(files)
    g = graph(found)
    circles = cycles(g, sorted(files))
    assert not circles, f"{len(circles)} import circle(s):\n" + "\n".join(describe_cycle(c, g) for c in circles)


def test_core_does_not_import_callbacks():
    bad = [imp for imp in imports()
           if not any(_in(imp.source, p) for p in OUTSIDE_CORE) and _in(imp.target, CALLBACKS)]
    assert not bad, ("the core imports fluxlora.callbacks (the callbacks import the core, not the reverse):\n"
                     + "\n".join(f"    {i.source} -> {i.target}: {i.where()}" for i in bad))


def test_every_room_is_a_package_and_every_module_has_a_docstring():
    missing_init = []
    for top in SOURCES.values():
        for d in [top, *sorted(p for p in top.rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or any(p.is_symlink() for p in [d, *_dirs_between(top, d)]):
                continue
            if any(d.glob("*.py")) and not (d / "__init__.py").is_file():
                missing_init.append(str(d.relative_to(ROOT)))
    no_doc = [str(p.relative_to(ROOT)) for p in module_files().values()
              if ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) is None]
    assert not missing_init, f"directories of modules without an __init__.py: {missing_init}"
    assert not no_doc, f"modules without a docstring: {no_doc}"


def test_every_package_is_installed():
    """A subpackage missing from pyproject.toml's package list is left out of the wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in module_files().items() if p.name == "__init__.py"}
    assert packages <= listed, f"packages not listed in pyproject.toml: {sorted(packages - listed)}"


if __name__ == "__main__":
    if "--modules" in sys.argv[1:]:
        for imp in sorted(imports(), key=lambda i: (i.source, i.target, i.line)):
            print(f"{imp.source} -> {imp.target}  ({imp.where()})")
    elif "--dot" in sys.argv[1:]:
        print(dot(imports()))
    else:
        print(__doc__)
