"""The architecture as tests: where knowledge may live and which way imports run.

(a) No module under ``capture/``, ``search/`` or ``export/`` mentions an accelkit op by name: what they
    know about ops comes from the op registry (``accelkit/kernels/registry.py``). The forbidden names
    are derived from the registry itself, so a new op is covered the day it registers.
    :func:`mentions` takes any list of forbidden words (:data:`FORBIDDEN_VOCABULARIES`): op names, and
    the registered passes' config fields (:func:`pass_field_vocabulary`): passes describe, seed, ablate
    and claim precision through their hooks (``accelkit/passes/hooks.py``).
(b) The package import graph (every ``import`` in ``accelkit/**/*.py``, lazy ones inside functions
    included) runs downward through :data:`LAYERS` and has no cycle. The edges that break it today are
    listed in :data:`KNOWN_VIOLATIONS`, each with the change that removes it; a listed edge that no
    longer exists fails the test too, so the list only shrinks.
(c) ``import accelkit`` stays lean: tests/unit/test_lean_import.py.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from accelkit.kernels.registry import load_builtin_ops

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "accelkit"

# ---------------------------------------------------------------- (a) op names stay in kernels/

# Packages that must learn about ops from the registry only.
OP_AGNOSTIC_PACKAGES = ("capture", "search", "export")


def registered_op_vocabulary() -> set[str]:
    """Every name an op registers under: op names, ONNX function / marker names, TensorRT plugin names."""
    words: set[str] = set()
    for name, spec in load_builtin_ops().items():
        if not name.startswith("accelkit::"):
            continue  # a test's toy op registered by another test module
        words.add(name.split("::", 1)[1])
        words.update(op_type for _, op_type in spec.precision.int4_weight_nodes)
        if spec.tensorrt is not None:
            words.update((spec.tensorrt.name, spec.tensorrt.onnx_function[1]))
    return words


def _framework_names() -> set[str]:
    """Names of the pass framework itself (``Program.num_steps``, ``schedule``, ``version`` ...): every
    layer may use them, so a config field spelled the same (``StepsConfig.num_steps``) is not forbidden."""
    import dataclasses

    from accelkit.passes.base import GraphVariant, PassConfig, PassResult, Program

    names: set[str] = set()
    for kind in (Program, GraphVariant, PassResult, PassConfig):
        names |= {f.name for f in dataclasses.fields(kind)} | {n for n in vars(kind) if not n.startswith("_")}
    return names


def pass_field_vocabulary() -> set[str]:
    """Pass config fields that ``capture/``, ``search/``, ``export/`` must not know (issue #15 item 2).

    For every registered pass (built-in ones; a test's toy pass has no ``accelkit`` module): each field
    as ``<pass>.<field>`` (how seeds and messages spell it), and each field whose name holds an underscore
    (``full_step_mask``, ``act_mode``, ``kept_16bit``) as a bare word. One-word fields (``rank``, ``bits``,
    ``score``, ``warmup``) are ordinary English and identifiers elsewhere (a tensor's rank, the timing
    warm-up), so only their qualified form is forbidden; names of the framework itself are allowed.
    """
    import dataclasses

    from accelkit.passes.base import registered_passes

    framework = _framework_names()
    words: set[str] = set()
    for name, entry in registered_passes().items():
        if not entry.config_type.__module__.startswith("accelkit.passes."):
            continue  # a test's toy pass registered by another test module
        for field in dataclasses.fields(entry.config_type):
            if field.name in framework:
                continue
            words.add(f"{name}.{field.name}")
            if "_" in field.name:
                words.add(field.name)
    return words


FORBIDDEN_VOCABULARIES: dict[str, Callable[[], set[str]]] = {
    "op name": registered_op_vocabulary,
    "pass field": pass_field_vocabulary,
}


def modules_of(packages: Iterable[str]) -> list[Path]:
    return sorted(p for package in packages for p in (PACKAGE / package).rglob("*.py"))


def mentions(paths: Iterable[Path], words: Iterable[str]) -> list[str]:
    """``"path:line: word"`` for every whole-word occurrence of ``words`` in ``paths`` (code, comments, docs)."""
    words = sorted(set(words))
    if not words:
        return []
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{where}:{number}: {match.group(1)}")
    return found


def test_the_op_vocabulary_comes_from_the_registry():
    words = registered_op_vocabulary()
    # Sanity: the built-in ops are registered, so the check below is not vacuous.
    assert len(words) >= 3
    assert all(w.isidentifier() for w in words)


def test_the_pass_field_vocabulary_comes_from_the_registered_configs():
    words = pass_field_vocabulary()
    # The fields search/ and export/ used to read, so the check below is not vacuous.
    assert {"full_step_mask", "act_mode", "kept_16bit", "full_fraction", "steps.fraction", "steps.placement"} <= words
    assert not words & {"version", "num_steps", "schedule", "rank", "fraction"}


def test_mentions_finds_a_planted_word(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("x = 1\n# calls some_op here\n")
    assert mentions([planted], ["some_op"]) and not mentions([planted], ["other_op"])


@pytest.mark.parametrize("vocabulary", sorted(FORBIDDEN_VOCABULARIES))
def test_capture_search_export_do_not_name_registered_things(vocabulary):
    words = FORBIDDEN_VOCABULARIES[vocabulary]()
    if not words:
        pytest.skip(f"no {vocabulary} vocabulary is registered yet (see {FORBIDDEN_VOCABULARIES[vocabulary].__name__})")
    found = mentions(modules_of(OP_AGNOSTIC_PACKAGES), words)
    assert not found, (
        f"these modules name a {vocabulary}; read it from its registry instead:\n" + "\n".join(found)
    )


# ---------------------------------------------------------------- (b) import layers

# Lowest first; a package imports only packages of its own or a lower layer. Stated from what imports
# what (2026-12, main plus the issue #15 branches), following docs/DESIGN.md:
#   - artifacts (typed plan file / manifests, feat/reliability) and families (feat/families) import
#     only errors/_io; capture reads families.
#   - kernels/ sits below capture/: an op and its registry are the vocabulary graphs are written in
#     (capture/cost.py reads the registry), and kernels import nothing of accelkit but layer 0.
#   - pipeline_io (feat/families) and loading sit above capture: probe_and_capture() captures.
#   - export/ sits below runtime/: the ORT and TensorRT runners replay exported models and read their
#     manifests; export imports capture/passes/kernels only.
#   - report/ (metrics, rendering) sits below search/, which scores fidelity with report.metrics.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "_io", "_signals"),  # _signals: feat/reliability
    ("families", "zoo", "artifacts"),
    ("kernels",),
    ("capture",),
    ("pipeline_io", "loading"),
    ("calibrate",),
    ("passes",),
    ("export",),
    ("runtime",),
    ("report",),
    ("search",),
    ("workflows",),
    ("cli",),
    ("accelkit",),  # the package root: the public facade (lazy attributes)
)

# (importing module, imported package) -> the change that removes the edge. Owners in brackets.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    ("accelkit/calibrate/__init__.py", "passes"): "passes get a CalibrationSource protocol (#15 item 4)",
    ("accelkit/calibrate/__init__.py", "runtime"): "generation through a CalibrationSource (#15 item 4)",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the accelkit modules ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base)
                names.add(f"{prefix}.{node.module}" if node.module else prefix)
                if not node.module:
                    names.update(f"{prefix}.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "accelkit" or n.startswith("accelkit.")}


def _package_of(module: str) -> str:
    """``accelkit.export.onnx`` -> ``export``; ``accelkit.errors`` -> ``errors``; ``accelkit`` -> ``accelkit``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "accelkit"


def import_edges() -> dict[tuple[str, str], str]:
    """``(importing module path, imported package) -> imported module`` across packages."""
    edges: dict[tuple[str, str], str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _package_of(_module_name(path))
        for target in sorted(_imported_modules(path)):
            imported = _package_of(target)
            # ``import accelkit`` (for __version__) is free: every submodule import runs the root
            # __init__ anyway, and the root's facade imports nothing eagerly (lazy attributes).
            if imported != source and imported != "accelkit":
                edges.setdefault((str(path.relative_to(ROOT)), imported), target)
    return edges


def _layer(package: str) -> int:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    raise AssertionError(f"package '{package}' is in no layer: add it to LAYERS in {__file__}")


def test_every_package_has_a_layer():
    packages = {_package_of(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    for package in packages:
        _layer(package)


def test_imports_only_run_downward():
    upward = []
    for (module, imported), target in import_edges().items():
        if (module, imported) in KNOWN_VIOLATIONS:
            continue
        source = _package_of(_module_name(ROOT / module))
        if _layer(imported) > _layer(source):
            upward.append(f"{module} imports {target} ({source} is below {imported})")
    assert not upward, "imports that run up the layers (see LAYERS):\n" + "\n".join(upward)


def test_known_violations_still_exist():
    edges = import_edges()
    fixed = [f"{module} -> {package}" for module, package in KNOWN_VIOLATIONS if (module, package) not in edges]
    assert not fixed, "these are fixed: remove them from KNOWN_VIOLATIONS:\n" + "\n".join(fixed)


#: What the command line may import: it parses, validates, calls a workflow and prints (issue #15 item 5).
CLI_MAY_IMPORT = ("accelkit.workflows", "accelkit.errors", "accelkit._signals", "accelkit.cli")


def _outside(imported: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The module names in ``imported`` that are none of ``allowed`` nor inside one of them."""
    allowed = tuple(allowed)
    return sorted(m for m in imported if not any(m == a or m.startswith(a + ".") for a in allowed))


def test_outside_tells_a_package_from_a_prefix():
    assert _outside(["accelkit.errors.InputError", "accelkit.cli.validate"], CLI_MAY_IMPORT) == []
    assert _outside(["accelkit.errors_extra", "accelkit.search.optimize"], CLI_MAY_IMPORT) == [
        "accelkit.errors_extra", "accelkit.search.optimize"]


def test_the_cli_calls_only_workflows():
    """cli/main.py reaches the libraries through accelkit.workflows alone, lazy imports included."""
    outside = _outside(_imported_modules(PACKAGE / "cli" / "main.py"), CLI_MAY_IMPORT)
    assert not outside, ("accelkit/cli/main.py imports these directly; call a workflow (accelkit/workflows/) "
                         "instead:\n" + "\n".join(outside))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a node list, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_package_graph_is_acyclic_without_the_known_violations():
    graph: dict[str, set[str]] = {}
    for (module, imported), _ in import_edges().items():
        if (module, imported) not in KNOWN_VIOLATIONS:
            graph.setdefault(_package_of(_module_name(ROOT / module)), set()).add(imported)
    assert _cycle(graph) is None, f"import cycle between packages: {' -> '.join(_cycle(graph))}"


def test_no_module_imports_a_module_that_imports_it_back():
    """Module-level circles inside a package too (export/lowerings.py <-> export/onnx.py was one)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imported_modules(path) if m in modules and m != name} for name, path in modules.items()}
    # A package __init__ re-exporting its modules is not a circle worth refusing.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(f"{m}.")}
    pairs = sorted((a, b) for a in graph for b in graph[a] if a in graph.get(b, ()) and a < b)
    assert not pairs, f"modules importing each other: {pairs}"
