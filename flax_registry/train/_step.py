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
from ._accumulate import accumulate
from ._mesh_step import StepOnMesh, constrain
from ._precision import Policy
from ._scaler import skip_if_overflow
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
    random keys for the step's rng streams. With a mixed-precision `policy`, floating
    parameters and inputs enter each call in its compute dtype and floating outputs leave it
    in its output dtype (`params` stays the master tree).
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
        policy: Policy | None = None,
    ) -> None:
        self.module = module
        self.params = params
        self.buffers = dict(buffers)
        self._key = key
        self._streams = tuple(rng_streams)
        self._call_kwargs = dict(call_kwargs)
        self._mutable = mutable
        self._policy = policy
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

    def __call__(self, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        if self._policy is not None:
            args, kwargs = self._policy.cast_to_compute((args, kwargs))
            return self._policy.cast_to_output(self._call(args, kwargs, method))
        return self._call(args, kwargs, method)

    def _call(self, args: Any, kwargs: dict[str, Any], method: Any) -> Any:
        kwargs = {**self._call_kwargs, **kwargs}
        rngs = self._rngs()
        self._calls += 1
        params = self.params if self._policy is None else self._policy.cast_to_compute(self.params)
        inputs = ({PARAMS: params, **self.buffers}, args, kwargs, rngs)
        if self._check_train:  # once: the first call of the first trace
            self._check_train = False
            self._refuse_eval_mode_layers(inputs, method)
        result = self._apply(inputs, method)
        if not self._mutable or not self.buffers:
            return result
        out, updates = result
        self.buffers = {**self.buffers, **{c: updates[c] for c in self.buffers if c in updates}}
        return out

    def _apply(self, inputs: tuple[Any, Any, Any, Any], method: Any) -> Any:
        variables, args, kwargs, rngs = inputs
        frontend = frontend_of(self.module)
        mutable = list(self.buffers) if self._mutable and self.buffers else False
        return frontend.apply(
            self.module, variables, *args, method=method, rngs=rngs, mutable=mutable, **kwargs
        )

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
    batch_norm: str = "global",
    replicas: int | None = None,
    micro_batches: int = 1,
    policy: Policy | None = None,
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
    - `metrics` holds `loss` and whatever `loss_fn` returned with it (and `skipped`, whether
      a float16 overflow skipped the step, when the state has a `GradScaler`).

    On a device mesh (a state placed by `shard_train_state`, a batch by `shard_batch`) the
    step is data-parallel over the batch's split, and every array of the new state keeps the
    sharding of the one it replaces. `batch_norm` says how BatchNorm layers compute batch
    statistics across the data-parallel replicas: "global" (the default: the whole batch's,
    `torch.nn.SyncBatchNorm`, the same numbers as one device) or "per_replica" (each
    replica's part on its own, PyTorch DDP's default; see `flax_registry.nn.mode.replicas`).
    `replicas` overrides the number of replicas read from the batch's sharding (e.g. to
    reproduce a 4-GPU DDP run on one device).

    `micro_batches > 1` accumulates gradients over that many micro-batches of the batch (see
    `flax_registry.train._accumulate`): PyTorch's several `loss.backward()` per
    `optimizer.step()`. `policy` runs the model in mixed precision (see `Policy`); a
    `GradScaler` in `state.loss_scale` scales the loss, unscales the gradients and skips the
    update on overflow, as `torch.amp.GradScaler`.

    With `donate=True` (the default) the input state's arrays are donated to the new one:
    do not use the old state after the call. Only arrays the state owns are consumed:
    `create_train_state` copies the variables it is given, so they stay valid.
    """
    from ..nn.mode import check_batch_stats
    from ..nn.mode import replicas as replica_context

    check_batch_stats(batch_norm)
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")

    def step(
        state: TrainState, batch: Any, n_replicas: int = 1, shardings: Any = None
    ) -> tuple[TrainState, dict[str, Any]]:
        kwargs = _call_kwargs(state.module, call_kwargs, train=True)
        check_train = call_kwargs is None and not _accepts_train(state.module)
        scaler = state.loss_scale

        def compute(
            params: Any, buffers: Any, batch: Any, key: jax.Array
        ) -> tuple[jax.Array, tuple[jax.Array, dict[str, Any], dict[str, Any]]]:
            model = Model(
                state.module,
                _stop_frozen(params, state.frozen),
                buffers,
                key=key,
                rng_streams=rng_streams,
                call_kwargs=kwargs,
                mutable=True,
                check_train=check_train,
                policy=policy,
            )
            loss, metrics = _split_result(loss_fn(model, batch))
            objective = loss if scaler is None else scaler.scale_loss(loss)
            return objective, (loss, metrics, model.buffers)

        key = jax.random.fold_in(state.key, state.step)
        grad_fn = jax.value_and_grad(compute, has_aux=True)
        with replica_context(n_replicas, batch_norm):
            grads, loss, metrics, buffers = accumulate(
                grad_fn, state.params, state.buffers, batch, key, micro_batches, n_replicas
            )
        if scaler is None:
            new_state = state.apply_gradients(grads)
        else:
            grads, found_inf = scaler.unscale(grads)
            new_state = skip_if_overflow(found_inf, state, state.apply_gradients(grads))
            new_state = new_state.replace(loss_scale=scaler.update(found_inf))
            metrics = {**metrics, "skipped": found_inf}
        new_state = constrain(new_state.replace(buffers=buffers), state, shardings)
        return new_state, {"loss": loss, **metrics}

    return StepOnMesh(step, jit=jit, donate=donate, replicas=replicas)


def make_eval_step(
    loss_fn: LossFn,
    *,
    call_kwargs: Mapping[str, Any] | None = None,
    jit: bool = True,
    policy: Policy | None = None,
) -> Callable[[TrainState, Any], dict[str, Any]]:
    """A step `(state, batch) -> metrics` that uses the buffers without changing them.

    The counterpart of `model.eval(); with torch.no_grad(): loss_fn(model, batch)`: the same
    `loss_fn` as the train step, the model called with `call_kwargs` (nothing by default, so
    `train=False`) and nothing mutable; a module that tries to update a buffer raises.
    `policy` runs the model in mixed precision, as in `make_train_step`.
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
            policy=policy,
        )
        loss, metrics = _split_result(loss_fn(model, batch))
        return {"loss": loss, **metrics}

    return jax.jit(step) if jit else step
