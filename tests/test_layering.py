"""Structure checks: no import cycle, a leaf seam, one definition of the statuses, every config key read,
no print in library code, a trial forwarder without torch."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

from efficientllava.config import ExperimentConfig

PACKAGE = Path(__file__).resolve().parents[1] / "efficientllava"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: set[str]) -> set[str]:
    """Package modules `path` imports, at any depth (function-level imports too; TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for block in ast.walk(tree) if _type_checking(block) for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_search_seam_is_a_leaf():
    deps = graph()["efficientllava.search.api"]
    assert deps <= {"efficientllava.errors"}, deps


def test_statuses_are_defined_once():
    literal = re.compile(r"""["'](COMPLETE|ERROR)["']""")
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*.py")
                 if p.name != "api.py" for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == []


def test_library_code_logs_instead_of_printing():
    # A module's `if __name__ == "__main__":` block is a script, and prints.
    def library_nodes(tree: ast.Module):
        for stmt in tree.body:
            if not (isinstance(stmt, ast.If) and "__main__" in ast.unparse(stmt.test)):
                yield from ast.walk(stmt)

    offenders = [f"{p.relative_to(PACKAGE.parent)}:{n.lineno}" for p in PACKAGE.rglob("*.py") if p.name != "cli.py"
                 for n in library_nodes(ast.parse(p.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert offenders == []


def config_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(section, section class name, key) of every leaf of the experiment config; top level: section ""."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and prefix:
            out.append((prefix, cls.__name__, f.name))  # a nested mapping (data.columns): read as a whole
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += [(f.name, tp.__name__, k) for _, _, k in config_keys(tp, f.name)]
        else:
            out.append((prefix, cls.__name__, f.name))
    return out


def reads(section: str, cls: str, key: str, text: str) -> bool:
    """Whether module `text` reads `section.key`: directly, through an alias of the section
    (`o = cfg.objective; o.lam`) or through a parameter typed with the section's class (`cfg: DataConfig`)."""
    if not section:
        return re.search(rf"\b(cfg|config)\.{key}\b", text) is not None
    if re.search(rf"\b{section}\.{key}\b", text):
        return True
    aliases = re.findall(rf"\b(\w+)\s*=\s*[\w.]+\.{section}\b", text) + re.findall(rf"\b(\w+)\s*:\s*{cls}\b", text)
    return any(re.search(rf"\b{a}\.{key}\b", text) for a in aliases)


def test_every_config_key_is_read_somewhere():
    """A key the code never reads (like projector.batch_size once was) fails here: use it or remove it."""
    texts = [p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "config.py"]
    unused = [f"{s}.{k}" if s else k for s, c, k in config_keys() if not any(reads(s, c, k, t) for t in texts)]
    assert unused == []


def test_the_config_key_check_sees_an_unread_key():
    assert not reads("projector", "ProjectorConfig", "batch_size", "steps = cfg.projector.steps\nb = cfg.eval.batch_size")
    assert reads("objective", "ObjectiveConfig", "lam", "o = cfg.objective\nx = o.lam")
    assert reads("data", "DataConfig", "seed", "def f(cfg: DataConfig):\n    return cfg.seed")


def test_the_trial_forwarder_and_the_cli_parser_import_no_model_code():
    """Tune's trial actors start fast; `efficientllava trials` and typos in options cost no torch import."""
    code = ("import sys, efficientllava.search.trainable; a = 'torch' in sys.modules\n"
            "from efficientllava.cli import build_parser; build_parser(); print(a, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False False"
