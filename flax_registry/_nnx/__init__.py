"""The flax.nnx adapter: the one place that knows NNX's graph and state handling. `NNX`
implements `flax_registry._frontend.Frontend`; the public names live in `flax_registry.nnx`."""

from .._frontend import register_frontend
from . import rules as rules
from .adapter import NNX as NNX
from .adapter import NNXDefinition as NNXDefinition

register_frontend(NNX)
