"""One `flax_registry.nn` layer (or model) holding a PyTorch module's weights, on either
front-end, behind one interface, so that a parity test is written once and run on both.

- linen: the layer definition and its variables; `fr.apply` runs it (buffers returned);
- nnx: the same definition lifted into NNX (`flax_registry.nnx.nn.LinenLayer`), loaded in place
  with `load_state_dict`, run as an NNX module in `model.train()` / `model.eval()` mode
  (buffers updated in place), differentiated with `nnx.value_and_grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_registry as fr
from flax_registry.nnx.nn import LinenLayer

FRONTENDS = ("linen", "nnx")

frontends = pytest.mark.parametrize("frontend", FRONTENDS)
"""Run a test once per front-end (the test takes a `frontend` argument)."""


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | jax.Array)


def _as_jax(x: Any) -> Any:
    """NumPy arrays as JAX arrays (NNX transforms take JAX arrays); anything else as it is."""
    return jax.tree.map(jnp.asarray, x) if x is not None else None


class Loaded:
    """A layer holding `theirs`' state_dict, loaded strictly, on `frontend`."""

    def __init__(self, frontend: str, ours: Any, theirs: torch.nn.Module) -> None:
        self.frontend = frontend
        self.definition = ours
        state = theirs.state_dict()
        abstract = fr.abstract_variables(ours)
        variables, result = fr.load_state_dict(ours, abstract, state)
        assert not result.missing_keys and not result.unexpected_keys
        self.variables = {"params": {}, **variables}
        self.model: LinenLayer | None = None
        if frontend == "nnx":
            # NNX variables of the right structure, then PyTorch's in-place load into them
            self.model = LinenLayer(ours, variables=jax.tree.map(jnp.zeros_like, variables))
            result = self.model.load_state_dict(state)
            assert not result.missing_keys and not result.unexpected_keys
        else:
            assert frontend == "linen", frontend

    # --- listings ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.model is not None:
            return fr.state_dict(self.model)
        return fr.state_dict(self.definition, self.variables)

    def named_buffers(self) -> dict[str, Any]:
        if self.model is not None:
            return dict(fr.named_buffers(self.model))
        return dict(fr.named_buffers(self.definition, self.variables))

    def named_parameters(self) -> dict[str, Any]:
        if self.model is not None:
            return dict(fr.named_parameters(self.model))
        return dict(fr.named_parameters(self.definition, self.variables))

    # --- running -----------------------------------------------------------------------------

    def __call__(self, *xs: Any, train: bool = False, rngs: Any = None, **kwargs: Any) -> Any:
        """The output; in train mode the buffers change as PyTorch's do."""
        if self.model is not None:
            self.model.train() if train else self.model.eval()
            if rngs is not None:
                self.model.rngs = nnx.Rngs(dropout=rngs["dropout"])
            static = {k: v for k, v in kwargs.items() if not _is_array(v)}
            arrays = {k: v for k, v in kwargs.items() if _is_array(v)}
            run = nnx.jit(lambda m, xs, kw: m(*xs, **kw, **static))  # one compilation
            return run(self.model, tuple(map(_as_jax, xs)), jax.tree.map(jnp.asarray, arrays))
        mode = {"train": True} if train else {}
        out, self.variables = fr.apply(
            self.definition, self.variables, *xs, rngs=rngs, **mode, **kwargs
        )
        return out

    def value_and_grads(
        self, loss: Callable[[Any], Any], *xs: np.ndarray, train: bool = False, **kwargs: Any
    ) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """`(output, input gradients, parameter gradients by torch name)` of
        `loss(output)`, jitted (the layer must trace and differentiate under jit)."""
        if self.model is not None:
            self.model.train() if train else self.model.eval()

            static = {k: v for k, v in kwargs.items() if not _is_array(v)}
            arrays = {k: jnp.asarray(v) for k, v in kwargs.items() if _is_array(v)}

            def f(model: Any, kw: Any, *inputs: Any) -> Any:
                y = model(*inputs, **kw, **static)
                return loss(y), y

            argnums = (0, *range(2, len(xs) + 2))
            step = nnx.jit(nnx.value_and_grad(f, argnums=argnums, has_aux=True))
            (_, out), grads = step(self.model, arrays, *map(_as_jax, xs))
            params = nnx.to_pure_dict(grads[0]).get("variables", {}).get("params", {})
            named = dict(fr.named_parameters(self.definition, {**self.variables, "params": params}))
            return out, grads[1:], named
        mode = {"train": True} if train else {}

        def g(params: Any, *inputs: Any) -> Any:
            variables = {**self.variables, "params": params}
            y, _ = fr.apply(self.definition, variables, *inputs, **mode, **kwargs)
            return loss(y), y

        argnums = tuple(range(len(xs) + 1))
        (_, out), grads = jax.jit(jax.value_and_grad(g, argnums=argnums, has_aux=True))(
            self.variables["params"], *xs
        )
        named = dict(fr.named_parameters(self.definition, {**self.variables, "params": grads[0]}))
        return out, grads[1:], named
