"""Property test: random module trees list like PyTorch, and state_dict round-trips exactly."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flax_registry as fr

# A module spec is a tuple of registration operations, in registration order:
#   ("param", name, shape | None)             register_parameter (None: registered as absent)
#   ("buffer", name, shape | None, persistent)
#   ("child", name, spec)                     a submodule
#   ("alias", name, earlier_child_name)       the same submodule under a second name
Spec = tuple[Any, ...]

shapes = st.one_of(st.none(), st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple))


@st.composite
def specs(draw: Any, depth: int = 0) -> Spec:
    ops: list[Any] = []
    children: list[str] = []
    n = draw(st.integers(0, 5))
    for i in range(n):
        choices = (
            ["param", "buffer"] + (["child"] if depth < 2 else []) + (["alias"] if children else [])
        )
        kind = draw(st.sampled_from(choices))
        if kind == "param":
            ops.append(("param", f"p{i}", draw(shapes)))
        elif kind == "buffer":
            ops.append(("buffer", f"b{i}", draw(shapes), draw(st.booleans())))
        elif kind == "child":
            ops.append(("child", f"m{i}", draw(specs(depth + 1))))
            children.append(f"m{i}")
        else:
            ops.append(("alias", f"a{i}", draw(st.sampled_from(children))))
    return tuple(ops)


class SpecModule(fr.Module):
    spec: Spec

    def setup(self) -> None:
        for op in self.spec:
            if op[0] == "param":
                value = None if op[2] is None else fr.Parameter(jnp.zeros(op[2]))
                self.register_parameter(op[1], value)
            elif op[0] == "buffer":
                value = None if op[2] is None else jnp.zeros(op[2])
                self.register_buffer(op[1], value, persistent=op[3])
            elif op[0] == "child":
                setattr(self, op[1], SpecModule(op[2]))
            else:
                setattr(self, op[1], getattr(self, op[2]))


class TorchSpecModule(torch.nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        for op in spec:
            if op[0] == "param":
                value = None if op[2] is None else torch.nn.Parameter(torch.zeros(op[2]))
                self.register_parameter(op[1], value)
            elif op[0] == "buffer":
                value = None if op[2] is None else torch.zeros(op[2])
                self.register_buffer(op[1], value, persistent=op[3])
            elif op[0] == "child":
                setattr(self, op[1], TorchSpecModule(op[2]))
            else:
                setattr(self, op[1], getattr(self, op[2]))


def names(pairs: Any) -> list[str]:
    return [name for name, _ in pairs]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), seed=st.integers(0, 2**31 - 1))
def test_random_trees_list_like_torch_and_round_trip(spec: Spec, seed: int) -> None:
    module, tmodule = SpecModule(spec), TorchSpecModule(spec)
    variables = fr.init_variables(module, jax.random.key(0))
    # Give every tensor distinct random values, through torch, so the round trip is not trivial.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tmodule.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    variables, keys = fr.load_state_dict(module, variables, tmodule.state_dict())
    assert keys == ([], [])

    for remove_duplicate in (True, False):
        for fn in ("named_parameters", "named_buffers"):
            ours = getattr(fr, fn)(module, variables, remove_duplicate=remove_duplicate)
            theirs = getattr(tmodule, fn)(remove_duplicate=remove_duplicate)
            assert names(ours) == names(theirs)
        assert names(
            fr.named_modules(module, variables, remove_duplicate=remove_duplicate)
        ) == names(tmodule.named_modules(remove_duplicate=remove_duplicate))
    sd = fr.state_dict(module, variables)
    assert list(sd) == list(tmodule.state_dict())
    for key, value in tmodule.state_dict().items():
        np.testing.assert_array_equal(np.asarray(sd[key]), value.numpy())

    reloaded, keys = fr.load_state_dict(module, variables, sd)
    assert keys == ([], [])
    assert jax.tree.structure(reloaded) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
