"""The package layout holds what dicom_ai/__init__.py promises.

* A part (subpackage) imports only from the parts above it in the flow order written in the
  package docstring, never from a part below it.
* No import loop between modules (top-level imports, which run at import time).
* Imports inside functions only in dicom_ai/cli (handlers load what they need when they run).
* The receiving process (dicom_ai.node without its worker) loads neither torch nor highdicom.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import dicom_ai

PACKAGE = Path(dicom_ai.__file__).resolve().parent
#: The flow order; a part may import the parts before it.
ORDER = ("core", "imaging", "networks", "results", "node", "data", "training", "cli")
#: Modules outside any part: the package itself and ``python -m dicom_ai``.
TOP = {"dicom_ai", "dicom_ai.__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The dicom_ai module an imported name lives in (``from pkg import submodule`` included)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, name: str) -> list[tuple[str, bool, int]]:
    """(imported dicom_ai module, at module top?, line) for every import statement in a module."""
    tree = ast.parse(path.read_text())
    top_nodes = set(map(id, tree.body))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t.startswith("dicom_ai"):
                mod = _resolve(t)
                if mod and mod != name:
                    found.append((mod, id(node) in top_nodes, node.lineno))
    return found


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def test_every_module_belongs_to_a_part():
    loose = [m for m in MODULES if m not in TOP and _part(m) is None]
    assert loose == [], f"modules outside the parts {ORDER}: {loose}"


def test_parts_import_only_the_parts_above_them():
    wrong = []
    for name, path in MODULES.items():
        part = _part(name)
        if part is None:
            continue
        for target, _, line in _imports(path, name):
            other = _part(target)
            if other is not None and other != part and ORDER.index(other) > ORDER.index(part):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({part}) imports {target} ({other})")
    assert wrong == [], "imports against the flow order:\n" + "\n".join(wrong)


def test_no_import_loop_between_modules():
    graph = {name: {t for t, top, _ in _imports(path, name) if top} for name, path in MODULES.items()}
    # A package's __init__ re-exporting its own modules is not a loop of the code; drop the
    # edges from a module to the packages that contain it.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    loops = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                loops.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert loops == [], "import loops:\n" + "\n".join(loops)


def test_imports_inside_functions_only_in_the_cli():
    lazy = []
    for name, path in MODULES.items():
        if _part(name) == "cli":
            continue
        tree = ast.parse(path.read_text())
        top_nodes = set(map(id, tree.body))
        type_checking = {id(n) for stmt in tree.body if isinstance(stmt, ast.If)
                         and "TYPE_CHECKING" in ast.unparse(stmt.test) for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_nodes | type_checking:
                lazy.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert lazy == [], "imports inside functions outside dicom_ai/cli:\n" + "\n".join(lazy)


def test_receiving_process_loads_neither_torch_nor_the_writers():
    # -X importtime lists every module the import loads, with its cost (self, cumulative, us).
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import dicom_ai.node"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in loaded if re.match(r"(torch|highdicom|SimpleITK|matplotlib|dicom_ai\.(networks|results|imaging|data|training))\b", m))
    assert heavy == [], f"the receiving process imports {heavy}"
    assert "pynetdicom" in loaded and "dicom_ai.node.scp" in loaded
