"""kvbm's packages import each other in one direction only.

Walks every module's source (imports inside functions and under
``TYPE_CHECKING`` included: a delayed import hides a cycle from Python, not
from the design) and fails on any cycle among kvbm's packages, where a
package is ``kvbm.core``, ``kvbm.storage``, ... and each top-level module
(``kvbm.config``, ``kvbm.metrics``) is a node of its own; under ``kvbm.tools``
each tool (``kvbm.tools.plan``, ``kvbm.tools.doctor``) is a node. The library
never imports a tool (``test_library_never_imports_tools``), and below the vLLM
adapter nothing imports vLLM (``test_only_the_adapter_imports_vllm``).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import kvbm

ROOT = Path(kvbm.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _node(module: str) -> str:
    """kvbm.storage.disk -> kvbm.storage; kvbm.config -> kvbm.config; kvbm.tools.plan.cli -> kvbm.tools.plan."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "tools":
        return ".".join(parts[:3])
    if len(parts) >= 2 and (ROOT / parts[1]).is_dir():
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) >= 2 else module


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from kvbm import config`
    return {name for name in found if name == "kvbm" or name.startswith("kvbm.")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        src = _node(module)
        for name in _imports(path, module):
            # `from kvbm.core import planner` names a module; `from kvbm.core.planner import X` a symbol.
            while name not in modules and "." in name:
                name = name.rpartition(".")[0]
            dst = _node(name)
            if dst != src and dst != "kvbm":
                graph[src].add(dst)
    return graph


def module_graph() -> dict[str, set[str]]:
    """Module -> the kvbm modules it imports (a package's ``__init__`` is a module too)."""
    graph: dict[str, set[str]] = defaultdict(set)
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        for name in _imports(path, module):
            while name not in modules and "." in name:
                name = name.rpartition(".")[0]
            if name != module and name in modules and name != "kvbm":
                graph[module].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle_among_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle among kvbm packages: " + " -> ".join(cycle or [])


def test_no_import_cycle_among_files():
    """Within a package too: two files that import each other (even lazily) are one module in two."""
    graph = module_graph()
    for module in list(graph):  # a package's __init__ re-exporting its own modules is not a cycle
        if (ROOT.parent / module.replace(".", "/") / "__init__.py").exists():
            graph[module] = {m for m in graph[module] if not m.startswith(module + ".")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among kvbm files: " + " -> ".join(cycle or [])


def test_the_walker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers():
    """core is pure policy; storage owns memory and files and imports nothing from transfer."""
    graph = package_graph()
    assert graph["kvbm.core"] <= {"kvbm.config"}, graph["kvbm.core"]
    assert "kvbm.transfer" not in graph["kvbm.storage"]
    for low in ("kvbm.core", "kvbm.storage", "kvbm.transfer", "kvbm.runtime"):
        assert "kvbm.vllm_integration" not in graph[low], low


#: Packages below the adapter: they read vLLM's objects duck-typed (``runtime/groups.py``, ``runtime/identity.py``,
#: ``runtime/events.py``) or not at all, and never import vLLM, lazily or for type checking either.
VLLM_FREE = ("kvbm.core", "kvbm.storage", "kvbm.transfer", "kvbm.runtime")


def _vllm_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
    return {name for name in found if name == "vllm" or name.startswith("vllm.")}


def test_only_the_adapter_imports_vllm():
    """vLLM's types stay in kvbm.vllm_integration: the packages below it run, and are tested, without vLLM."""
    offenders = sorted(f"{_module_name(path)} -> {name}" for path in ROOT.rglob("*.py")
                       if _node(_module_name(path)) in VLLM_FREE for name in _vllm_imports(path))
    assert not offenders, "imports of vLLM below the adapter: " + ", ".join(offenders)


def test_the_vllm_rule_sees_an_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from vllm.config import VllmConfig\n    import vllm\n    import vllmx\n")
    assert _vllm_imports(source) == {"vllm.config", "vllm"}


#: Outside kvbm/tools, only ``python -m kvbm`` (the ``kvbm`` command's other door) may import a tool.
TOOL_ENTRY_POINTS = {"kvbm.__main__"}


def _is_tool(module: str) -> bool:
    return module == "kvbm.tools" or module.startswith("kvbm.tools.")


def test_library_never_imports_tools():
    """Tools (kvbm/tools: the CLI, plan, bench, doctor, the router...) import the library, never the reverse.

    A vLLM engine loads the library; a tool's import there would drag aiohttp, matplotlib or a
    benchmark's state into every engine process, and tie the library's layering to the tools'.
    """
    offenders = sorted(f"{module} -> {name}" for module, names in module_graph().items()
                       if not _is_tool(module) and module not in TOOL_ENTRY_POINTS
                       for name in names if _is_tool(name))
    assert not offenders, "the library imports kvbm.tools: " + ", ".join(offenders)


def test_the_tools_rule_sees_an_import():
    """The rule's walker resolves ``from kvbm.tools.x import y`` and ``import kvbm.tools`` to tool modules."""
    graph = module_graph()
    assert "kvbm.tools.cli" in graph["kvbm.__main__"]
    assert _is_tool("kvbm.tools") and _is_tool("kvbm.tools.plan.cli") and not _is_tool("kvbm.toolsy")
