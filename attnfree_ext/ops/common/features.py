"""Arguments the compiled kernels do not take yet, as data: the aft_local prefix state and decoding chunks
(docs/design.md §9). A call that uses one runs on the pure-PyTorch path; ``backend_info`` says so. ``VARLEN`` says,
per op and path, how packed sequences (``cu_seqlens``) run: natively in the kernels or as one padded batch.

``backend_info(op, *tensors, **arguments)`` (exported as :func:`attnfree_ext.backend_info`) is the dispatcher's
``dispatch.backend_info`` plus keyword arguments naming the extra arguments of the call (``initial_state``,
``output_final_state``, ``cu_seqlens``, ``max_seqlen``, ``chunk``); with none given it is exactly the dispatcher's.
With ``cu_seqlens`` the result also has ``varlen``: path -> "native" / "padded" (``VARLEN``), and its summary names
the selected path's.
"""

from __future__ import annotations

from . import dispatch

__all__ = [
    "PYTHON_ONLY_ARGUMENTS",
    "VARLEN",
    "NATIVE",
    "PADDED",
    "python_only_reasons",
    "require_python",
    "backend_info",
]

_STATE = "the aft_local prefix state runs on the pure-PyTorch path (its kernels take no state)"
_CHUNK = "a decoding chunk (k, v with more rows than q) runs on the pure-PyTorch path"

#: op -> argument -> why a call using it runs on the pure-PyTorch path (None: the compiled kernels take it too)
PYTHON_ONLY_ARGUMENTS = {
    "aft_simple": {"initial_state": None, "output_final_state": None, "cu_seqlens": None, "max_seqlen": None},
    "aft_local": {"initial_state": _STATE, "chunk": _CHUNK, "cu_seqlens": None, "max_seqlen": None},
    "aft_full": {"chunk": _CHUNK, "cu_seqlens": None, "max_seqlen": None},
}

NATIVE = "native"  # the kernels scan / reduce each packed sequence alone on its rows (no padded copy)
PADDED = "padded"  # one call on the padded batch (N, T_max, D), padding keys masked with -inf (docs/design.md §7)

#: op -> path -> how a call with cu_seqlens runs there (docs/design.md §9.3)
VARLEN = {
    "aft_simple": {"python": PADDED, "compiled": NATIVE},
    "aft_local": {"python": PADDED, "compiled": PADDED},
    "aft_full": {"python": PADDED, "compiled": PADDED},
}


def python_only_reasons(op: str, **arguments) -> list[str]:
    """One reason per argument of ``op`` that is used (not None / not False) and has no compiled kernel."""
    table = PYTHON_ONLY_ARGUMENTS.get(op, {})
    unknown = set(arguments) - set(table)
    if unknown:
        raise ValueError(f"{op} has no argument(s) {sorted(unknown)} here; known: {sorted(table)}")
    used = [name for name in table if arguments.get(name) is not None and arguments.get(name) is not False]
    used = [name for name in used if table[name] is not None]
    return [f"{name} given: {table[name]}" for name in used]


def require_python(op: str, why: list[str]) -> None:
    """Raise RuntimeError when the compiled path is forced for a call that only the Python path can run."""
    if why and dispatch._requested() == "compiled":
        raise RuntimeError(
            f"attnfree_ext: backend 'compiled' was forced for {op} but it cannot run these inputs:\n  - "
            + "\n  - ".join(why)
        )


def backend_info(op: str, *tensors, **arguments) -> dict:
    """``dispatch.backend_info`` for a call that also passes ``arguments`` (e.g. ``initial_state=s``,
    ``output_final_state=True``, ``cu_seqlens=cu``, ``chunk=True``): same keys; ``selected`` is "python" (None
    when "compiled" is forced) when one of them has no compiled kernel, with the reason listed."""
    info = dispatch.backend_info(op, *tensors)
    why = python_only_reasons(op, **arguments)
    if not why:
        _add_varlen(info, op, arguments)
        return info
    info["reasons"]["compiled"] = why + [r for r in info["reasons"]["compiled"] if r not in why]
    if info["requested"] == "compiled":
        info["selected"] = None
        info["summary"] = f"{op}: compiled forced but unsupported ({'; '.join(info['reasons']['compiled'])})"
    else:
        info["selected"] = "python"
        info["reasons"]["python"] = []
        info["summary"] = f"{op}: python; compiled skipped ({'; '.join(info['reasons']['compiled'])})"
    _add_varlen(info, op, arguments)
    return info


def _add_varlen(info: dict, op: str, arguments: dict) -> None:
    # with cu_seqlens: "varlen" = how the packed sequences run on the selected path (VARLEN), and the summary says so
    if arguments.get("cu_seqlens") is None or op not in VARLEN:
        return
    info["varlen"] = {path: VARLEN[op][path] for path in ("python", "compiled")}
    if info["selected"] is not None:
        info["summary"] += f"; packed sequences: {VARLEN[op][info['selected']]} ({info['selected']} path)"
