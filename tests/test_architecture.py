"""The shape of the package, checked: one adapter knows linen, the import graph has no circle,
each public call reads the module tree once, and the subpackages are attributes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

import flax_registry as fr
from flax_registry import nn
from flax_registry._linen import tree as linen_tree

PACKAGE = Path(fr.__file__).parent
ADAPTER = PACKAGE / "_linen"
NNX_ADAPTER = PACKAGE / "_nnx"
# The torch.nn-compatible layers are linen classes (the linen front-end's own layer set); they
# may use linen's public API, but no private name.
LINEN_CLASSES = PACKAGE / "nn"

# linen's private names and internals; outside nn/ also the linen API itself (scopes, binding)
PRIVATE_FLAX = re.compile(
    r"_try_setup|_get_unbound_fn|\._state\.|setup_called|SetupState|intercept_methods|"
    r"flax\.linen\.module|flax\.core"
)
LINEN_API = re.compile(r"\.scope\b|\.unbind\(|\.bind\(|\.is_initializing\(|\bnn\.Module\b")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


class _NoStrings(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        return ast.Constant("") if isinstance(node.value, str) else node


def _code(path: Path) -> str:
    """The code without comments, docstrings and string literals (messages may name what
    they describe)."""
    return ast.unparse(_NoStrings().visit(ast.parse(path.read_text())))


def _imports_linen(path: Path) -> bool:
    """Imports flax.linen (flax's API-neutral utilities, such as `flax.struct`, are fine)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(
            a.name.startswith("flax.linen") for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("flax.linen") or (
                module == "flax" and any(a.name == "linen" for a in node.names)
            ):
                return True
    return False


def _imports_nnx(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.startswith("flax.nnx") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("flax.nnx") or (
                module == "flax" and any(a.name == "nnx" for a in node.names)
            ):
                return True
    return False


def test_only_the_nnx_adapter_touches_nnx() -> None:
    offenders = [
        name
        for name, path in _modules().items()
        if not path.is_relative_to(NNX_ADAPTER) and _imports_nnx(path)
    ]
    assert offenders == []


def test_only_the_adapter_touches_linen() -> None:
    offenders = []
    for name, path in _modules().items():
        if path.is_relative_to(ADAPTER):
            continue
        code = _code(path)
        offenders += [f"{name}: {m}" for m in sorted(set(PRIVATE_FLAX.findall(code)))]
        if path.is_relative_to(LINEN_CLASSES):
            continue
        offenders += [f"{name}: {m}" for m in sorted(set(LINEN_API.findall(code)))]
        if _imports_linen(path):
            offenders.append(f"{name}: imports flax.linen")
    assert offenders == []


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every flax_registry module `name` imports, anywhere in the file (function-local imports
    included; `if TYPE_CHECKING:` blocks, which never run, excluded)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != name}


def test_import_graph_has_no_circle() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how packages are built; a module
    # importing its package back is a circle.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle.extend([*stack[stack.index(dep) :], dep] if dep in stack else [node, dep])
                return True
            if dep not in state and visit(dep, [*stack, dep]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if name not in state and visit(name, [name]):
            break
    assert cycle == [], " -> ".join(cycle)


def test_subpackages_are_attributes() -> None:
    for name in ("nn", "io", "convert", "train", "checkpoint"):
        assert getattr(fr, name).__name__ == f"flax_registry.{name}"
    from flax_registry.convert import IDENTITY, LINEAR, Map, Rule  # noqa: F401


# --- one module-tree build per public call ------------------------------------------------------


class Net(fr.Module):
    def setup(self) -> None:
        self.features = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.register_buffer("scale", jnp.ones(()), persistent=False)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return self.head(self.features(x, train=train)) * self.scale


class Compact(linen.Module):
    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return linen.Dense(3, name="head")(linen.relu(linen.Dense(8, name="body")(x)))


def _builds(call) -> int:  # type: ignore[no-untyped-def]
    before = linen_tree.BUILDS["count"]
    call()
    return linen_tree.BUILDS["count"] - before


def test_each_public_call_builds_the_tree_once() -> None:
    model = Net()
    variables = fr.init_variables(model, jax.random.key(0))
    state = fr.state_dict(model, variables)
    torch_like = {k: np.asarray(v) for k, v in state.items()}
    compact = Compact()
    x = jnp.ones((2, 4))
    cvars = compact.init(jax.random.key(0), x)
    calls = {
        "state_dict": lambda: fr.state_dict(model, variables),
        "named_parameters": lambda: list(fr.named_parameters(model, variables)),
        "named_buffers": lambda: list(fr.named_buffers(model, variables)),
        "named_modules": lambda: list(fr.named_modules(model, variables)),
        "get_parameter": lambda: fr.get_parameter(model, variables, "head.weight"),
        "load_state_dict": lambda: fr.load_state_dict(model, variables, torch_like),
        "load_state_dict (abstract)": lambda: fr.load_state_dict(
            model, fr.abstract_variables(model), torch_like
        ),
        "from_torch": lambda: fr.from_torch(model, torch_like),
        "from_torch (variables)": lambda: fr.from_torch(model, torch_like, variables=variables),
        "to_torch": lambda: fr.to_torch(model, variables),
        "from_torch (compact)": lambda: fr.from_torch(
            compact, fr.to_torch(compact, cvars, example_inputs=(x,)), example_inputs=(x,)
        ),
        "abstract_variables": lambda: fr.abstract_variables(model),
        "init_variables": lambda: fr.init_variables(model, jax.random.key(1)),
    }
    counts = {name: _builds(call) for name, call in calls.items()}
    expected = {name: 1 for name in calls}
    expected["from_torch (compact)"] = 2  # to_torch inside the lambda, then from_torch
    expected["abstract_variables"] = expected["init_variables"] = 0  # setup only, no tree
    assert counts == expected


@pytest.mark.parametrize(
    "fn", [fr.from_torch, fr.load_state_dict, fr.to_torch, fr.create_train_state]
)
def test_public_functions_have_args_and_returns_docstrings(fn) -> None:  # type: ignore[no-untyped-def]
    doc = fn.__doc__ or ""
    assert "Args:" in doc and "Returns:" in doc and "Example:" in doc, fn.__name__
