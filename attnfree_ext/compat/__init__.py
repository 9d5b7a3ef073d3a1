"""Drop-in replacements for the implementations people use today: change one import, keep the state_dict.

- aft-pytorch 0.2.2: AFTFull, AFTSimple, AFTLocal
- External-Attention-pytorch: AFT_FULL, ExternalAttention
- timm (CaiT): TalkingHeadAttn
"""

from .aft_pytorch import AFTFull, AFTLocal, AFTSimple
from .external_attention import AFT_FULL, ExternalAttention
from .timm import TalkingHeadAttn

__all__ = ["AFTFull", "AFTSimple", "AFTLocal", "AFT_FULL", "ExternalAttention", "TalkingHeadAttn"]
