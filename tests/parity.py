"""Helpers that compare a flax_registry module with its PyTorch twin on the same numbers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

import flax_registry as fr
from flax_registry._arrays import torch_to_numpy

TOL = {"rtol": 1e-5, "atol": 1e-5}


def to_numpy(x: Any) -> np.ndarray:
    return torch_to_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x)


def torch_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The torch module's state_dict as numpy arrays (bit-exact)."""
    return {k: to_numpy(v) for k, v in module.state_dict().items()}


def key(seed: int) -> jax.Array:
    """An 'rbg' key: XLA's RngBitGenerator compiles far faster on CPU than threefry, which
    keeps the tests fast; the layers take any key."""
    return jax.random.key(seed, impl="rbg")


def load_from_torch(module: Any, torch_module: torch.nn.Module, *example: Any) -> dict[str, Any]:
    """Variables for `module` holding `torch_module`'s state_dict, loaded strictly, no renames."""
    # Abstract variables: a strict load fills every leaf, and no random init is compiled.
    variables = fr.abstract_variables(module, *example)
    new, missing = fr.load_state_dict(module, variables, torch_module.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return new


def assert_state_dict_matches(module: Any, variables: Any, torch_module: torch.nn.Module) -> None:
    """Same keys in the same order, same shapes, same dtype kind (integer buffers integer)."""
    assert_state_dict_keys_match(fr.state_dict(module, variables), torch_module)


def assert_state_dict_keys_match(ours: Any, torch_module: torch.nn.Module) -> None:
    """`ours` (a state dict) has torch's keys in torch's order, shapes and dtype kinds."""
    theirs = torch_module.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert tuple(ours[key].shape) == tuple(value.shape), key
        assert np.dtype(ours[key].dtype).kind == to_numpy(value).dtype.kind, key


def assert_close(actual: Any, expected: Any, **tol: float) -> None:
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), **(tol or TOL))


def assert_buffers_match(module: Any, variables: Any, torch_module: torch.nn.Module) -> None:
    """Every buffer (running statistics, counters) equals torch's; integer buffers exactly."""
    assert_named_buffers_match(dict(fr.named_buffers(module, variables)), torch_module)


def assert_named_buffers_match(ours: Any, torch_module: torch.nn.Module) -> None:
    """`ours` (named buffers) equal torch's buffers; integer buffers exactly."""
    assert [k for k, _ in torch_module.named_buffers()] == list(ours)
    for key, value in torch_module.named_buffers():
        expected = to_numpy(value)
        if expected.dtype.kind in "iub":
            np.testing.assert_array_equal(np.asarray(ours[key]), expected, err_msg=key)
        else:
            assert_close(ours[key], expected)


def input_and_param_grads(
    module: Any,
    variables: Any,
    torch_module: torch.nn.Module,
    inputs: Sequence[np.ndarray],
    *,
    train: bool = False,
    reduce: Callable[[Any], Any] | None = None,
) -> None:
    """Gradients of sum(output * cotangent) w.r.t. inputs and parameters agree with autograd."""
    kwargs = {"train": True} if train else {}
    out = fr.apply(module, variables, *[jnp.asarray(x) for x in inputs], **kwargs)[0]
    cot = np.random.default_rng(0).standard_normal(np.shape(out)).astype(np.float32)

    def loss(params: Any, *xs: Any) -> Any:
        y, _ = fr.apply(module, {**variables, "params": params}, *xs, **kwargs)
        return jnp.sum(y * cot)

    argnums = tuple(range(len(inputs) + 1))
    grads = jax.grad(loss, argnums=argnums)(
        variables.get("params", {}), *[jnp.asarray(x) for x in inputs]
    )
    t_inputs = [torch.tensor(x, requires_grad=True) for x in inputs]
    torch_module.train(train)
    (torch_module(*t_inputs) * torch.tensor(cot)).sum().backward()
    for x, g in zip(t_inputs, grads[1:]):
        assert_close(g, x.grad, rtol=1e-4, atol=1e-5)
    ours = dict(fr.named_parameters(module, {**variables, "params": grads[0]}))
    for name, p in torch_module.named_parameters():
        assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-5)
