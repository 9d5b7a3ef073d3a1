"""Decoding state of the causal AFT layers (docs/design.md §9.2).

``forward(x, state=None, return_state=False)`` of a causal :class:`~attnfree_ext.nn.AFTSimple`,
:class:`~attnfree_ext.nn.AFTLocal` or :class:`~attnfree_ext.nn.AFTFull` returns ``(y, state)`` when
``return_state``; passing that state to the next call continues the sequence where it ended (positions included),
for chunks of any length >= 1. Every tensor is in the compute dtype: float32 for float16/bfloat16/float32
activations, float64 for float64. The states are plain tensors or NamedTuples of tensors (and one int), so they pass
through ``torch.compile`` and can be detached (truncated BPTT) or kept in the graph.

* AFTSimple: the (B, 3, D) tensor of :func:`attnfree_ext.aft_simple` (rows m, sum exp(k - m) v, sum exp(k - m));
  O(B * D), D = hidden_dim.
* AFTLocal: :class:`AFTLocalState`; O(B * D) for the keys older than the window plus the last window - 1 keys and
  values.
* AFTFull: :class:`AFTFullState`; the keys and values so far (a cache), O(B * T * D).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["AFTLocalState", "AFTFullState"]


class AFTLocalState(NamedTuple):
    """State of a causal AFTLocal after ``offset`` tokens.

    prefix: (B, 3, D), the aft_simple state of the keys at positions < offset - (window - 1) (they are out of every
        later row's band: bias 0).
    k, v: (B, min(offset, window - 1), D), the projected keys and values of the last window - 1 positions.
    offset: the number of tokens seen (the position of the next token).
    """

    prefix: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    offset: int


class AFTFullState(NamedTuple):
    """State of a causal AFTFull: the projected keys and values of every position so far, each (B, offset, D);
    the next token's position is ``k.shape[1]``."""

    k: torch.Tensor
    v: torch.Tensor
