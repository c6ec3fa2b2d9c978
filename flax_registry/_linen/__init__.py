"""The flax.linen adapter: the one place that knows linen (its modules, scopes, `setup`,
`init`/`apply` and private names). `Module` is the linen base class with PyTorch's
register_parameter / register_buffer; `LINEN` implements `flax_registry._frontend.Frontend`.
"""

from .._frontend import register_frontend
from . import rules as rules
from .adapter import LINEN as LINEN
from .module import Module as Module

register_frontend(LINEN)
