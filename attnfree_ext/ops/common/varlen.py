"""Packed variable-length sequences (``cu_seqlens``, flash-attention's varlen convention; docs/design.md §9.3).

q, k, v of shape (1, total_T, D) hold N sequences back to back; sequence i is rows
``cu_seqlens[i] : cu_seqlens[i + 1]``. No sequence sees another, and each one's positions restart at 0.

Native form (compiled aft_simple, csrc/aft_simple/aft_simple_varlen.h): the kernels scan each sequence alone on the
packed rows. Padded form (the Python path, and aft_local / aft_full on every path): a padded batch
(N, T_max, D) (T_max = max_seqlen when given, else the longest sequence, one host read): a gather puts every
token at (its sequence, its position), padding keys are masked with k = -inf (a masked key, docs/design.md §7, so
no real row sees them, causal or not), the op runs once on the padded batch, and a gather takes the real rows back.
No Python loop over sequences; gathers are differentiable, so gradients (dw summed over sequences) come by autograd
around the op's own backward. Memory O(N * T_max * D) for the padded copies.
"""

from __future__ import annotations

import torch

__all__ = ["check_cu_seqlens", "check_max_seqlen", "check_varlen_bias", "Packing", "packing"]


def _values_readable(cu_seqlens: torch.Tensor) -> bool:
    # reading the offsets is free on the CPU in eager mode; on CUDA it is a host sync, under torch.compile a graph
    # break (the compiled aft_simple op checks CPU offsets itself, in C++)
    return cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()


def check_cu_seqlens(cu_seqlens, q: torch.Tensor, max_seqlen=None) -> None:
    """``cu_seqlens``: an int32 or int64 tensor of shape (N + 1,) on q's device, starting at 0, non-decreasing and
    ending at total_T; q must be (1, total_T, D). ``max_seqlen``: None or an int >= the longest sequence.
    Raises TypeError / ValueError naming the argument. The values (and max_seqlen against them) are checked for
    CPU offsets in eager mode; CUDA offsets are trusted (reading them would synchronise with the device)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor (int32 or int64), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (N + 1,) with N >= 0, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; they must share a device")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k and v must be packed as (1, total_T, D), got {tuple(q.shape)}")
    check_max_seqlen(max_seqlen)
    if not _values_readable(cu_seqlens):
        return
    total = q.shape[1]
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at total_T = q.shape[1] = {total}, got {cu[-1]}")
    longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(
            f"max_seqlen = {max_seqlen} is smaller than the longest sequence of cu_seqlens ({longest}); it must "
            "bound every sequence"
        )


def check_max_seqlen(max_seqlen) -> None:
    """``max_seqlen``: None or an int >= 0 (a bound on the longest packed sequence, flash-attention's argument)."""
    if max_seqlen is None:
        return
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"max_seqlen must be an int (the longest sequence's length) or None, got {max_seqlen!r}")
    if not isinstance(max_seqlen, torch.SymInt) and max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")


class Packing:
    """Where each packed token sits in the padded batch: sequence ``seq`` (total_T,), position ``pos`` (total_T,);
    ``t_max`` the padded length: ``max_seqlen`` when given (no host sync), else the longest sequence."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int, max_seqlen=None):
        cu = cu_seqlens.to(torch.int64)
        self.n = cu.numel() - 1
        if max_seqlen is not None:
            self.t_max = max_seqlen
        else:
            self.t_max = int((cu[1:] - cu[:-1]).max()) if self.n > 0 else 0
        tok = torch.arange(total, device=cu.device)
        # sequence of token i: the number of ends <= i (empty sequences share an end and are skipped)
        self.seq = torch.searchsorted(cu[1:], tok, right=True)
        self.pos = tok - cu[self.seq] if total else tok

    def pad(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """(1, total_T, D) -> (N, T_max, D), ``fill`` at padding positions."""
        out = x.new_full((self.n, self.t_max, x.shape[2]), fill)
        return out.index_put((self.seq, self.pos), x[0])

    def pad_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q, k, v as the padded batch, padding keys -inf (masked: docs/design.md §7), q and v 0 there."""
        return self.pad(q, 0.0), self.pad(k, float("-inf")), self.pad(v, 0.0)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T_max, D) -> (1, total_T, D)."""
        return x[self.seq, self.pos][None]


def packing(cu_seqlens: torch.Tensor, q: torch.Tensor, max_seqlen=None) -> Packing:
    """Validate ``cu_seqlens`` (and ``max_seqlen``) against q (1, total_T, D) and return its :class:`Packing`."""
    check_cu_seqlens(cu_seqlens, q, max_seqlen)
    return Packing(cu_seqlens, q.shape[1], max_seqlen)


def check_varlen_bias(name: str, w: torch.Tensor, t_max: int) -> torch.Tensor:
    """w covering the longest sequence: (L, L) or (heads, L, L) with L >= T_max; returns w[..., :T_max, :T_max]
    (sequence i uses w[..., :len_i, :len_i]). T_max is max_seqlen when given."""
    if w.dim() not in (2, 3) or w.shape[-1] != w.shape[-2] or w.shape[-1] < t_max:
        raise ValueError(
            f"with cu_seqlens, {name} must have shape (T_max, T_max) or (heads, T_max, T_max) covering the longest "
            f"sequence (T_max = {t_max}, max_seqlen when given), got {tuple(w.shape)}"
        )
    return w[..., :t_max, :t_max]
