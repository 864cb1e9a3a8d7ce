"""The architecture's rules, checked on the source (docs/architecture.md): the layer contracts in
pyproject.toml hold (import-linter), there is no import cycle at all, modules stay small, private names
stay in their module, function-local imports are only for heavy or optional dependencies, families are
data, and tests take their helpers from one support module."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "llava_gguf"
MAX_LINES = 400
# imported inside a function only: slow to import or not always installed (each such import says so)
HEAVY = {"torch", "transformers", "llama_cpp", "fastapi", "uvicorn", "starlette", "huggingface_hub", "ray",
         "playwright", "pillow_heif", "readline", "sentencepiece", "pyarrow"}


def sources(*roots: Path) -> list[Path]:
    return sorted(p for r in roots for p in r.rglob("*.py") if "__pycache__" not in p.parts)


def test_layer_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    p = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "BROKEN" not in p.stdout and "0 broken" in p.stdout


def _cycles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for j in range(i, len(edges[node])):
                nxt = edges[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_no_import_cycles_counting_every_import_statement():
    # grimp reads every import statement: module-level, inside functions and under TYPE_CHECKING
    graph = grimp.build_graph("llava_gguf", exclude_type_checking_imports=False)
    modules = {m for m in graph.modules if m.startswith("llava_gguf")}
    assert _cycles(graph, modules) == []


def test_the_cycle_finder_finds_a_cycle():
    class Graph:
        imports = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.imports[m]

    assert _cycles(Graph(), {"a", "b", "c", "d"}) == [["a", "b", "c"]]


@pytest.mark.parametrize("root", ["llava_gguf", "training", "devkit", "bench"])
def test_no_module_over_the_limit(root):
    long = {str(p.relative_to(ROOT)): n for p in sources(ROOT / root)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node


def test_no_private_name_imported_across_modules():
    bad = []
    for p in sources(PACKAGE, ROOT / "training", ROOT / "devkit", ROOT / "bench", ROOT / "tests"):
        for node in _imports(ast.parse(p.read_text())):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {a.name}")
    assert bad == []


def test_private_attributes_of_other_objects_only_in_native():
    """llama-cpp-python's private attributes (llm._ctx, llm._model) and any other object's private state are
    touched in native/ only; elsewhere an object reads its own (self._x) and nothing else's."""
    bad = []
    for p in sources(PACKAGE, ROOT / "bench"):
        if p.is_relative_to(PACKAGE / "native"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                # an object's own state, and the standard library's documented underscore functions
                # (os._exit after Ctrl-C: it must not wait for a quantizer thread that cannot be stopped)
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls", "os", "sys"):
                    continue
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert bad == []


def test_function_local_imports_only_for_heavy_dependencies_and_said_so():
    bad = []
    for p in sources(PACKAGE):
        text = p.read_text()
        lines = text.splitlines()
        for fn in ast.walk(ast.parse(text)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if p == PACKAGE / "__init__.py" and fn.name == "__getattr__":
                continue  # PEP 562: `from llava_gguf import LLaVA` without loading the runtime on `import llava_gguf`
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." if node.level else node.module]
                else:
                    continue
                top = {n.split(".")[0] for n in names}
                where = f"{p.relative_to(ROOT)}:{node.lineno} {', '.join(names)}"
                if not top <= HEAVY:
                    bad.append(where)
                elif "#" not in lines[node.lineno - 1] and not lines[node.lineno - 2].strip().startswith("#"):
                    bad.append(where + " (no comment says why it is local)")
    assert bad == []


def test_families_are_data():
    """Nothing outside families/ branches on a family's name."""
    pattern = re.compile(r"family\.name\s*(==|!=|\bin\b|\bnot in\b)|\.name\s*==\s*[\"']llava")
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in sources(PACKAGE) if not p.is_relative_to(PACKAGE / "families")
           for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert bad == []


def test_tests_import_helpers_from_the_support_module_only():
    bad = []
    for p in sources(ROOT / "tests"):
        for node in _imports(ast.parse(p.read_text())):
            mod = node.module or ""
            if mod == "conftest" or mod.startswith("test_") or mod.startswith("tests."):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {mod}")
    assert bad == []
