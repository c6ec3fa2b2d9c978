"""`make_train_step` / `make_eval_step`: jit-compiled steps from one user loss function.

The loss function is written as in a PyTorch loop, against a callable model:

    def loss_fn(model, batch):
        logits = model(batch["image"])          # the forward pass (train=True in a train step)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}

It returns the scalar loss, or `(loss, metrics)`. `model.params` is the parameter tree being
differentiated (for explicit regularisers). In a train step every call of `model` runs with
the buffer collections mutable and hands the updated buffers to the next call and to the new
state, as PyTorch's in-place buffer updates would; gradients are taken with respect to
`params` only. In an eval step `model` runs with nothing mutable, so buffers cannot change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._frontend import ModuleDef, frontend_of
from .._nested import key_path
from .._registry import PARAMS
from ._state import TrainState

LossFn = Callable[..., Any]

_BAD_LOSS = (
    "loss_fn must return a scalar loss or a (loss, metrics) pair; it returned {what}. "
    "Reduce the loss to a scalar, e.g. with .mean()."
)
NO_TRAIN_ARGUMENT = (
    "make_train_step: {module}.__call__ takes no `train` argument, so {layers} ran in eval "
    "mode (train=False, their default) in a training step: BatchNorm's running statistics do "
    "not update and dropout does nothing, where PyTorch's model.train() switches every layer. "
    "Fix: give {module}.__call__ a `train: bool = False` argument and pass it on "
    "(`self.bn(x, train=train)`, or `flax_registry.nn.mode.call(layer, x, train=train)` for any "
    "layer); or, to train with these layers in eval mode on purpose (e.g. frozen BatchNorm), "
    "pass call_kwargs={{}} to make_train_step."
)


class Model:
    """The module bound to a step's parameters and buffers, called as a PyTorch model is.

    `model(*args, method=None, **kwargs)` runs `module.apply`; `call_kwargs` of the step
    (`train=True` in a train step) are added to every call, and each call gets its own
    random keys for the step's rng streams.
    """

    def __init__(
        self,
        module: ModuleDef,
        params: Any,
        buffers: Mapping[str, Any],
        *,
        key: jax.Array | None,
        rng_streams: Sequence[str],
        call_kwargs: Mapping[str, Any],
        mutable: bool,
        check_train: bool = False,
    ) -> None:
        self.module = module
        self.params = params
        self.buffers = dict(buffers)
        self._key = key
        self._streams = tuple(rng_streams)
        self._call_kwargs = dict(call_kwargs)
        self._mutable = mutable
        self._calls = 0
        self._check_train = check_train

    @property
    def variables(self) -> dict[str, Any]:
        return {PARAMS: self.params, **self.buffers}

    def _rngs(self) -> dict[str, jax.Array] | None:
        if self._key is None or not self._streams:
            return None
        call_key = jax.random.fold_in(self._key, self._calls)
        return {s: jax.random.fold_in(call_key, i) for i, s in enumerate(self._streams)}

    def _apply(self, inputs: tuple[Any, Any, Any, Any], method: Any) -> Any:
        variables, args, kwargs, rngs = inputs
        frontend = frontend_of(self.module)
        mutable = list(self.buffers) if self._mutable and self.buffers else False
        return frontend.apply(
            self.module, variables, *args, method=method, rngs=rngs, mutable=mutable, **kwargs
        )

    def __call__(self, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        kwargs = {**self._call_kwargs, **kwargs}
        rngs = self._rngs()
        self._calls += 1
        inputs = (self.variables, args, kwargs, rngs)
        if self._check_train:  # once: the first call of the first trace
            self._check_train = False
            self._refuse_eval_mode_layers(inputs, method)
        result = self._apply(inputs, method)
        if not self._mutable or not self.buffers:
            return result
        out, updates = result
        self.buffers = {**self.buffers, **{c: updates[c] for c in self.buffers if c in updates}}
        return out

    def _refuse_eval_mode_layers(self, inputs: Any, method: Any) -> None:
        """Raise if layers called without the `train` they take behave differently with
        `train=True` (BatchNorm, Dropout; not LayerNorm): the front-end compares programs."""
        frontend = frontend_of(self.module)
        layers = frontend.eval_mode_layers(lambda x: self._apply(x, method), inputs)
        if layers:
            raise TypeError(
                NO_TRAIN_ARGUMENT.format(
                    module=frontend.display_name(self.module), layers=", ".join(layers)
                )
            )


def _accepts_train(module: ModuleDef) -> bool:
    return frontend_of(module).accepts_train(module)


def _call_kwargs(module: ModuleDef, given: Mapping[str, Any] | None, train: bool) -> dict[str, Any]:
    if given is not None:
        return dict(given)
    return {"train": True} if train and _accepts_train(module) else {}


def _split_result(result: Any) -> tuple[jax.Array, dict[str, Any]]:
    if isinstance(result, tuple):
        if len(result) != 2:
            raise TypeError(_BAD_LOSS.format(what=f"a tuple of {len(result)} items"))
        loss, metrics = result
        metrics = dict(metrics) if isinstance(metrics, Mapping) else {"aux": metrics}
    else:
        loss, metrics = result, {}
    if jnp.shape(loss) != ():
        raise TypeError(_BAD_LOSS.format(what=f"an array of shape {jnp.shape(loss)}"))
    return loss, metrics


def _stop_frozen(params: Any, frozen: frozenset[Any]) -> Any:
    if not frozen:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jax.lax.stop_gradient(p) if key_path(path) in frozen else p, params
    )


def make_train_step(
    loss_fn: LossFn,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
    rng_streams: Sequence[str] = ("dropout",),
    jit: bool = True,
    donate: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
    """A step `(state, batch) -> (new_state, metrics)`: forward, backward, optimizer update.

    The counterpart of `model.train(); loss = loss_fn(model, batch); loss.backward();
    optimizer.step(); optimizer.zero_grad()`:

    - `loss_fn(model, batch)` returns the loss or `(loss, metrics)` (see `Model`);
    - gradients are taken with respect to `state.params` only; frozen parameters are behind
      `stop_gradient` (their gradient is zero, and XLA drops its computation);
    - buffers are threaded through the forward pass as mutable and returned updated;
    - `call_kwargs` are passed to every model call; by default `{'train': True}` when the
      module's `__call__` takes a `train` keyword (the `flax_registry.nn` convention), else
      nothing. In that case, when the module calls layers that take `train` without passing
      it, and with `train=True` they would behave differently (BatchNorm, Dropout), the step
      raises `TypeError` at its first trace instead of silently training them in eval mode
      (`call_kwargs={}` runs them in eval mode on purpose);
    - each step draws its keys for `rng_streams` from `fold_in(state.rng, state.step)`,
      so a resumed run draws the same dropout masks as an uninterrupted one;
    - `metrics` holds `loss` and whatever `loss_fn` returned with it.

    With `donate=True` (the default) the input state's arrays are donated to the new one:
    do not use the old state after the call. Only arrays the state owns are consumed:
    `create_train_state` copies the variables it is given, so they stay valid.
    """

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        kwargs = _call_kwargs(state.module, call_kwargs, train=True)
        check_train = call_kwargs is None and not _accepts_train(state.module)
        key = jax.random.fold_in(state.key, state.step)

        def compute(params: Any) -> tuple[jax.Array, tuple[dict[str, Any], dict[str, Any]]]:
            model = Model(
                state.module,
                _stop_frozen(params, state.frozen),
                state.buffers,
                key=key,
                rng_streams=rng_streams,
                call_kwargs=kwargs,
                mutable=True,
                check_train=check_train,
            )
            loss, metrics = _split_result(loss_fn(model, batch))
            return loss, (metrics, model.buffers)

        (loss, (metrics, buffers)), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads).replace(buffers=buffers)
        return new_state, {"loss": loss, **metrics}

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(
    loss_fn: LossFn,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
    jit: bool = True,
) -> Callable[[TrainState, Any], dict[str, Any]]:
    """A step `(state, batch) -> metrics` that uses the buffers without changing them.

    The counterpart of `model.eval(); with torch.no_grad(): loss_fn(model, batch)`: the same
    `loss_fn` as the train step, the model called with `call_kwargs` (nothing by default, so
    `train=False`) and nothing mutable; a module that tries to update a buffer raises.
    """

    def step(state: TrainState, batch: Any) -> dict[str, Any]:
        kwargs = _call_kwargs(state.module, call_kwargs, train=False)
        model = Model(
            state.module,
            state.params,
            state.buffers,
            key=None,
            rng_streams=(),
            call_kwargs=kwargs,
            mutable=False,
        )
        loss, metrics = _split_result(loss_fn(model, batch))
        return {"loss": loss, **metrics}

    return jax.jit(step) if jit else step
