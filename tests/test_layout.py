"""The layout's rules, read from the code with ``ast``: imports inside ``pipeline/`` form no
cycle, only ``pipeline/cluster`` imports ray (and, for Ray Serve, the three modules of
``pipeline/serve`` that are Serve code), no private Ray module is imported outside the one
place that explains it, and imports inside functions are only of torch, ray or pyiceberg
(or of pipeline modules that import them), each with its reason on the line or the one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pipeline"
RAY_PACKAGE = "pipeline.cluster"
# The query service runs on Ray Serve, and a Serve deployment, a Ray metric or a Serve process
# cannot be written without importing ray: these modules of pipeline/serve may. The rest of the
# package (the request contract, tokenizing, the queue limit, the model identity) stays
# Ray-free, so it is tested in process, and the service reaches no other part through Ray.
SERVE_RAY_MODULES = {"pipeline.serve.app", "pipeline.serve.metrics", "pipeline.serve.server"}
PRIVATE_RAY_ALLOWED = {"pipeline.cluster.expert_groups"}  # _actor_dead: see its docstring
# Imports that may be made inside a function: these (and modules that import them).
HEAVY = ("torch", "ray", "pyiceberg", "huggingface_hub")
# Packages whose names load torch modules on first use (``__getattr__``), not at import.
HEAVY_PACKAGES = {"pipeline.model"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` in module ``name`` names."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path):
    """``(imported module, line, inside a function)`` for every import of a module; ``from M
    import a`` counts as importing ``M.a`` when that is a module of the pipeline, else ``M``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    mods = modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in inside
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node, name, path.name == "__init__.py")
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            for module in subs or [target]:
                yield module, node.lineno, id(node) in inside


def pipeline_graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports at module level (the edges that can cycle)."""
    mods = modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _, in_function in imports(name, path):
            if not in_function and target in mods and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_pipeline():
    cycle = find_cycle(pipeline_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_cluster_package_imports_ray():
    offenders = [f"{name}:{line}" for name, path in modules().items()
                 if not (name == RAY_PACKAGE or name.startswith(RAY_PACKAGE + "."))
                 and name not in SERVE_RAY_MODULES
                 for target, line, in_function in imports(name, path)
                 if (target == "ray" or target.startswith("ray.")) and not in_function]
    assert not offenders, f"ray imported outside {RAY_PACKAGE}: {offenders}"


def test_the_service_imports_no_job_or_cluster_code_and_its_pure_parts_no_ray():
    graph = pipeline_graph()
    serve = {name for name in graph if name.startswith("pipeline.serve")}
    assert serve >= SERVE_RAY_MODULES
    reached = [f"{name} -> {target}" for name in serve for target in graph[name]
               if target.startswith(("pipeline.jobs", "pipeline.cluster", "pipeline.stages"))]
    assert not reached, f"the service imports batch-job code: {reached}"
    pure = serve - SERVE_RAY_MODULES
    through = [f"{name} -> {target}" for name in pure for target in graph[name]
               if target in SERVE_RAY_MODULES]
    assert not through, f"a Ray-free module of pipeline/serve imports a Ray one: {through}"


def test_no_private_ray_api_outside_its_one_place():
    offenders = [f"{name}:{line} {target}" for name, path in modules().items()
                 for target, line, _ in imports(name, path)
                 if target.startswith("ray.") and any(p.startswith("_") for p in target.split("."))
                 and name not in PRIVATE_RAY_ALLOWED]
    assert not offenders, f"private Ray modules imported: {offenders}"


def _heavy(target: str, graph: dict[str, set[str]], seen=None) -> bool:
    """Whether importing ``target`` imports torch, ray, pyiceberg or huggingface_hub (directly
    or through pipeline modules, at module level)."""
    if target.split(".")[0] in HEAVY or target in HEAVY_PACKAGES:
        return True
    if target not in graph:
        return False
    seen = seen or set()
    if target in seen:
        return False
    seen.add(target)
    path = modules()[target]
    if any(t.split(".")[0] in HEAVY for t, _, inside in imports(target, path) if not inside):
        return True
    return any(_heavy(t, graph, seen) for t in graph[target])


def test_imports_inside_functions_are_heavy_and_explained():
    graph = pipeline_graph()
    bad = []
    for name, path in modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, in_function in imports(name, path):
            if not in_function:
                continue
            if not _heavy(target, graph):
                bad.append(f"{name}:{line} imports {target} inside a function, and it is light")
            elif not any(mark in " ".join(lines[max(0, line - 4):line]).lower()
                         for mark in ("#", "lazy")):
                bad.append(f"{name}:{line} imports {target} lazily without saying why")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["stages", "jobs", "cluster", "io", "bench", "serve"])
def test_packages_of_the_layout_exist(package):
    assert (ROOT / package / "__init__.py").is_file()
