"""Optimizer state of a model whose layout is unlike PyTorch's (a scanned decoder: every layer
one slice of an `(L, ...)` variable; stacked k/v and gate/up projections): PyTorch's Adam state
loads into those slices and exports back, as the weights do."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import flax_registry as fr
from flax_registry import train
from tests.convert._decoder import Config, twin
from tests.convert._scanned_model import RULES, TIED, ScannedDecoder

C = Config(layers=3)


def test_adam_state_of_a_scanned_decoder_round_trips() -> None:
    torch_model = twin(C)
    opt = torch.optim.Adam(torch_model.parameters(), lr=1e-2)
    ids = torch.tensor(np.random.default_rng(0).integers(0, C.vocab, (2, 5)))
    for _ in range(2):
        opt.zero_grad()
        torch_model(ids).square().mean().backward()
        opt.step()
    model = ScannedDecoder(C)
    example = (ids.numpy(),)
    variables, report = fr.from_torch(
        model, torch_model.state_dict(), example_inputs=example, rules=RULES, tied=TIED
    )
    assert report.ok
    tx = train.torch_adam(1e-2)
    state = train.create_train_state(model, variables, tx)
    # the flax definition orders the layers' submodules its own way: say PyTorch's order
    order = [name for name, _ in torch_model.named_parameters()]
    state, layout = train.optimizer_state_from_torch(
        state,
        opt.state_dict(),
        tx,
        param_order=order,
        example_inputs=example,
        rules=RULES,
        tied=TIED,
    )
    exported: Any = train.optimizer_state_to_torch(
        state, tx, layout=layout, example_inputs=example, rules=RULES, tied=TIED
    )
    theirs = opt.state_dict()["state"]
    assert sorted(exported["state"]) == sorted(theirs)
    for index, entry in theirs.items():
        for key in ("exp_avg", "exp_avg_sq"):
            ours = np.asarray(exported["state"][index][key])
            np.testing.assert_array_equal(ours, entry[key].numpy(), err_msg=f"{index} {key}")
