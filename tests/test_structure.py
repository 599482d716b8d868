"""The package's shape: no import cycles between its modules, and the public face."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "firm_lightning"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports: at module level, inside functions, and under
    ``if TYPE_CHECKING:`` (a cycle of type names is still a cycle in the design)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # the deepest package module the name denotes (a submodule, else the module it is taken from)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "firm_lightning":  # the package face is not a dependency of its modules
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_the_package():
    graph = import_graph()
    assert "firm_lightning.engine" in graph and "firm_lightning.flower.strategy" in graph
    assert cycles(graph) == []


def test_the_public_face():
    import firm_lightning as fl

    for name in ("FIRMClientModule", "PromptDataModule", "FederationConfig", "FederatedOrchestrator", "TrainerFactory",
                 "RoundEngine", "DifferentialPrivacy", "FIRM", "LocalMGDA", "Linear", "FMGDA", "RegularizedMinNorm",
                 "LinearScalarization", "CharsetReward", "HFRewardModel", "NormalizedReward", "EarlyStopping",
                 "SaveBestAdapter", "FederationCallback", "SamplingSettings", "PolicyGradientSettings", "LoRASettings"):
        assert name in fl.__all__, name
        assert getattr(fl, name) is not None
    assert len(set(fl.__all__)) == len(fl.__all__)
    for name in fl.__all__:
        assert hasattr(fl, name), name
    with pytest.raises(AttributeError):
        fl.NoSuchThing  # noqa: B018
