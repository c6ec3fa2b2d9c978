"""Checkpoint translation between PyTorch and any Flax model: `from_torch`, `to_torch`, rules.

`from_torch(module, source)` loads a PyTorch `state_dict` or checkpoint file into the
variables of a `flax_registry` module or of plain Flax code built from standard layers;
`to_torch(module, variables)` writes the PyTorch `state_dict` back. Layer mappings are data
(`Rule`, picked by layer type or module path); `register_rule` adds one for a layer type of
your own. Layouts that differ from PyTorch's are data too: `einsum_layout` (a kernel shaped
for its einsum), `Stacked` (several torch keys as one array on a new axis), `Scanned` (L
numbered layers as one `(L, ...)` array per variable) and `Child` (a renamed submodule).
"""

from .._inputs import Inputs as Inputs
from ._einsum import einsum_layout as einsum_layout
from ._export import to_torch as to_torch
from ._layer_layouts import MultiHeadAttentionRule as MultiHeadAttentionRule
from ._layer_layouts import conv_layout as conv_layout
from ._layer_layouts import conv_transpose_layout as conv_transpose_layout
from ._layer_layouts import dense_general_layout as dense_general_layout
from ._layout import IDENTITY as IDENTITY
from ._layout import LINEAR as LINEAR
from ._layout import Layout as Layout
from ._report import LoadReport as LoadReport
from ._rules import Child as Child
from ._rules import Fused as Fused
from ._rules import Map as Map
from ._rules import Rule as Rule
from ._rules import Scanned as Scanned
from ._rules import Stacked as Stacked
from ._rules import TorchOnly as TorchOnly
from ._rules import find_rule as find_rule
from ._rules import register_rule as register_rule
from ._rules import unregister_rule as unregister_rule
from ._translate import from_torch as from_torch

__all__ = [
    "IDENTITY",
    "LINEAR",
    "Child",
    "Fused",
    "Inputs",
    "Layout",
    "LoadReport",
    "Map",
    "MultiHeadAttentionRule",
    "Rule",
    "Scanned",
    "Stacked",
    "TorchOnly",
    "conv_layout",
    "conv_transpose_layout",
    "dense_general_layout",
    "einsum_layout",
    "find_rule",
    "from_torch",
    "register_rule",
    "to_torch",
    "unregister_rule",
]
