"""nn.Module layers. Token layers map (B, T, dim) -> (B, T, dim); AFTConv2d maps (B, dim, H, W) -> same."""

from .aft import AFTConv2d, AFTFull, AFTLocal, AFTSimple
from .external import ExternalAttention, MultiHeadExternalAttention
from .talking_heads import TalkingHeadAttention

__all__ = [
    "AFTFull",
    "AFTLocal",
    "AFTSimple",
    "AFTConv2d",
    "ExternalAttention",
    "MultiHeadExternalAttention",
    "TalkingHeadAttention",
]
