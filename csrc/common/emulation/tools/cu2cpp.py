#!/usr/bin/env python3
"""cu2cpp: the one source transformation the CPU emulation harness needs (see ../README.md).

g++ cannot parse two CUDA constructs, so they are rewritten in a copy of the file; everything else is compiled
as written, with the harness headers standing in for the CUDA ones:

  * kernel launches      KERNEL<<<grid, block[, smem[, stream]]>>>(args...)
                     ->  ::attnfree_emu::launch_at(ATTNFREE_EMU_KERNEL(KERNEL), "KERNEL", __FILE__, __LINE__,
                                                   __PRETTY_FUNCTION__, grid, block[, ...])(args...)
                         (ATTNFREE_EMU_KERNEL: a generic lambda calling KERNEL, so that template arguments are
                         deduced from the launch arguments as nvcc does)
  * dynamic shared mem   extern __shared__ [__align__(n)|alignas(n)] TYPE name[];
                     ->  TYPE* const name = ::attnfree_emu::dynamic_smem<TYPE>();
  * static shared mem    __shared__ TYPE a[N], b;
                     ->  static TYPE a[N], b; [[maybe_unused]] static const bool attnfree_emu_shN =
                             (::attnfree_emu::static_smem(&a, sizeof(a)), ..., true);
                         (one static object per declaration - blocks run one at a time - registered on first
                         execution so that the runtime poisons it with NaN before every block; the section
                         attribute the plain macro uses is ignored by GCC in template instantiations), and
                         [[maybe_unused]] const bool attnfree_emu_useN = ::attnfree_emu::static_smem_use("a", ...)
                         && ...; executed by every thread: one copy cannot serve the CTAs of a cluster (a fault)

Comments, string and character literals are left alone. Line structure is preserved (every newline of the original
text is kept), and the output starts with a #line directive naming the original file, so compiler diagnostics,
__FILE__ and __LINE__ point at the original source.

Usage as a program:  cu2cpp.py IN OUT     (OUT '-' = stdout)
Usage as a module:   rewrite(text, path) -> (new_text, n_launches, n_dynamic_shared)
"""
from __future__ import annotations

import re
import sys

_IDENT = re.compile(r"[A-Za-z0-9_]")


def _code_mask(text: str) -> list[bool]:
    """mask[i] is True where text[i] is code (not inside a comment or a string/char literal)."""
    n = len(text)
    mask = [True] * n
    i = 0
    while i < n:
        c = text[i]
        if c == "/" and i + 1 < n and text[i + 1] == "/":
            j = i
            while j < n and text[j] != "\n":
                # a backslash-newline continues a // comment
                if text[j] == "\\" and j + 1 < n and text[j + 1] == "\n":
                    j += 1
                j += 1
            for k in range(i, j):
                mask[k] = False
            i = j
        elif c == "/" and i + 1 < n and text[i + 1] == "*":
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                mask[k] = False
            i = j
        elif c == 'R' and i + 1 < n and text[i + 1] == '"' and (i == 0 or not _IDENT.match(text[i - 1])):
            # raw string literal R"delim( ... )delim"
            p = text.find("(", i + 2)
            delim = text[i + 2:p] if p >= 0 else ""
            end = text.find(")" + delim + '"', p + 1) if p >= 0 else -1
            j = n if end < 0 else end + len(delim) + 2
            for k in range(i, j):
                mask[k] = False
            i = j
        elif c == '"' or (c == "'" and not (i > 0 and re.match(r"[0-9A-Fa-f]", text[i - 1]) and
                                              i + 1 < n and re.match(r"[0-9A-Fa-f]", text[i + 1]))):
            # string / char literal (a ' between two hex digits is a C++14 digit separator)
            q = c
            j = i + 1
            while j < n and text[j] != q and text[j] != "\n":
                if text[j] == "\\":
                    j += 1
                j += 1
            j = min(n, j + 1)
            for k in range(i, j):
                mask[k] = False
            i = j
        else:
            i += 1
    return mask


def _match_back(text: str, mask: list[bool], j: int, open_c: str, close_c: str) -> int:
    """text[j] == close_c; return the index of the matching open_c (balanced, parentheses skipped inside <>)."""
    depth = 0
    paren = 0
    while j >= 0:
        if mask[j]:
            c = text[j]
            if open_c == "<" and c == ")":
                paren += 1
            elif open_c == "<" and c == "(":
                paren -= 1
            elif paren == 0 and c == close_c:
                depth += 1
            elif paren == 0 and c == open_c:
                depth -= 1
                if depth == 0:
                    return j
        j -= 1
    raise ValueError("unbalanced " + open_c + close_c)


def _callee_start(text: str, mask: list[bool], end: int) -> int:
    """Start of the postfix expression that ends just before `end` (the kernel expression before <<<):
    identifiers joined by '::', '.' or '->', each optionally followed by <template args>, (call args) or [index]."""
    j = end - 1
    while j >= 0 and text[j].isspace():
        j -= 1
    start = j + 1
    while j >= 0:
        c = text[j]
        if c in ">)]":
            j = _match_back(text, mask, j, {">": "<", ")": "(", "]": "["}[c], c) - 1
            start = j + 1
            while j >= 0 and text[j].isspace():
                j -= 1
            continue
        if not _IDENT.match(c):
            break
        while j >= 0 and _IDENT.match(text[j]):
            j -= 1
        start = j + 1
        k = j
        while k >= 0 and text[k].isspace():
            k -= 1
        if k >= 1 and text[k - 1:k + 1] in ("::", "->"):
            j = k - 2
            while j >= 0 and text[j].isspace():
                j -= 1
            if j < 0 or not (_IDENT.match(text[j]) or text[j] in ">)]"):
                start = k - 1  # a leading '::'
                break
            continue
        if k >= 0 and text[k] == ".":
            j = k - 1
            while j >= 0 and text[j].isspace():
                j -= 1
            continue
        break
    return start


def _find_close(text: str, mask: list[bool], i: int) -> int:
    """Index of the '>>>' closing the launch configuration that starts at i (parentheses/brackets balanced)."""
    depth = 0
    n = len(text)
    while i < n:
        if mask[i]:
            c = text[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif depth == 0 and text.startswith(">>>", i):
                return i
        i += 1
    raise ValueError("unterminated <<< launch configuration")


def _one_line(s: str) -> str:
    s = re.sub(r"\\\n", " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    return s.replace("\\", "\\\\").replace('"', '\\"')


_DYN = re.compile(r"\bextern\s+__shared__\s+([^;{}()]*?(?:\([^;{}]*?\)[^;{}()]*?)*)\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_ALIGN = re.compile(r"(__align__|alignas|__attribute__)\s*\(\s*(?:\([^()]*\)|[^()])*\)")


def _on_preprocessor_line(text: str, i: int) -> bool:
    j = text.rfind("\n", 0, i) + 1
    while True:  # continuation lines belong to the directive above
        line_start = j
        k = line_start
        while k < i and text[k] in " \t":
            k += 1
        if text.startswith("#", k):
            return True
        if line_start >= 2 and text[line_start - 2] == "\\":
            j = text.rfind("\n", 0, line_start - 1) + 1
            continue
        return False


def _decl_end(text: str, mask: list[bool], i: int):
    """Index of the ';' ending the declaration that starts at i (None if a '{' or ')' comes first)."""
    depth = 0
    n = len(text)
    while i < n:
        if mask[i]:
            c = text[i]
            if c in "([":
                depth += 1
            elif c in ")]":
                depth -= 1
                if depth < 0:
                    return None
            elif c == "{" or c == "}":
                return None
            elif c == ";" and depth == 0:
                return i
        i += 1
    return None


def _declarator_names(decl: str) -> list[str]:
    """Names declared by 'TYPE a[N][M], b, c[K]' (no initialisers in __shared__ declarations)."""
    parts, depth, cur = [], 0, ""
    for c in decl:
        if c in "([<":
            depth += 1
        elif c in ")]>":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    names = []
    for p in parts:
        p = _ALIGN.sub(" ", p)
        b = p.find("[")
        head = p if b < 0 else p[:b]
        m = re.search(r"([A-Za-z_]\w*)\s*$", head)
        if not m:
            return []
        names.append(m.group(1))
    return names


def rewrite(text: str, path: str = "<input>") -> tuple[str, int, int]:
    mask = _code_mask(text)
    out = []
    pos = 0
    n_launch = 0
    i = 0
    n = len(text)
    edits = []  # (start, end, replacement)
    while True:
        i = text.find("<<<", i)
        if i < 0:
            break
        if not mask[i]:
            i += 3
            continue
        start = _callee_start(text, mask, i)
        callee = text[start:i]
        close = _find_close(text, mask, i + 3)
        cfg = text[i + 3:close]
        if not callee.strip():
            raise ValueError(f"{path}: no kernel expression before <<< at offset {i}")
        repl = ("::attnfree_emu::launch_at(ATTNFREE_EMU_KERNEL(" + callee + '), "' + _one_line(callee)
                + '", __FILE__, __LINE__, __PRETTY_FUNCTION__, ' + cfg + ")")
        edits.append((start, close + 3, repl))
        n_launch += 1
        i = close + 3
    n_dyn = 0
    dyn_starts = set()
    for m in _DYN.finditer(text):
        if not mask[m.start()]:
            continue
        dyn_starts.add(m.start() + m.group(0).index("__shared__"))
        decl, name = m.group(1), m.group(2)
        ty = _ALIGN.sub(" ", decl).strip()
        nl = m.group(0).count("\n")
        repl = ty + "* const " + name + " = ::attnfree_emu::dynamic_smem<" + ty + ">();" + "\n" * nl
        edits.append((m.start(), m.end(), repl))
        n_dyn += 1
    n_static = 0
    for m in re.finditer(r"\b__shared__\b", text):
        st = m.start()
        if not mask[st] or (st in dyn_starts):
            continue
        if _on_preprocessor_line(text, st):
            continue
        end = _decl_end(text, mask, m.end())
        if end is None:
            continue
        decl = text[m.end():end]
        names = _declarator_names(decl)
        if not names:
            continue
        n_static += 1
        reg = ", ".join(f"::attnfree_emu::static_smem(&{nm}, sizeof({nm}))" for nm in names)
        use = " && ".join(f'::attnfree_emu::static_smem_use("{nm}", __FILE__, __LINE__)' for nm in names)
        repl = ("static" + decl + "; [[maybe_unused]] static const bool attnfree_emu_sh" + str(n_static)
                + " = (" + reg + ", true); [[maybe_unused]] const bool attnfree_emu_use" + str(n_static)
                + " = " + use + ";")
        edits.append((st, end + 1, repl))
    edits.sort()
    for s, e, r in edits:
        if s < pos:
            raise ValueError(f"{path}: overlapping rewrites at offset {s}")
        out.append(text[pos:s])
        out.append(r)
        pos = e
    out.append(text[pos:])
    body = "".join(out)
    header = '#line 1 "' + path.replace("\\", "\\\\").replace('"', '\\"') + '"\n'
    return header + body, n_launch, n_dyn


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    src, dst = argv[1], argv[2]
    with open(src, encoding="utf-8") as f:
        text = f.read()
    new, _, _ = rewrite(text, src)
    if dst == "-":
        sys.stdout.write(new)
    else:
        with open(dst, "w", encoding="utf-8") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
