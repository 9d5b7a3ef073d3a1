"""attnfree_ext: attention-free layers (AFT, External Attention, Talking-Heads) with stable, memory-lean kernels."""

from . import compat, nn
from ._config import show_config
from .ops.aft_conv import aft_conv2d
from .ops.aft_full import aft_full
from .ops.aft_local import aft_local
from .ops.aft_simple import aft_simple
from .ops.common.dispatch import force_backend
from .ops.common.features import backend_info
from .ops.ea_double_norm import ea_double_norm
from .ops.talking_heads import talking_heads_attention

__version__ = "0.1.0"

__all__ = [
    "aft_full",
    "aft_local",
    "aft_simple",
    "aft_conv2d",
    "ea_double_norm",
    "talking_heads_attention",
    "force_backend",
    "backend_info",
    "show_config",
    "nn",
    "compat",
]
