"""Pickled data read by its opcodes before anything is unpickled (:func:`pickle_problem`).

torch's weights-only unpickler builds only plain data, but plain data can cost without bound while
it is built. A tuple of tuples that share their parts (``t = (t, t)``, forty times: 957 bytes) is
hashed as a dict key or a set's member in one C call that visits 2**40 parts, deaf to Ctrl-C and
SIGTERM; ``bytearray(2000000000)`` (790 bytes) takes 2 GB. The check runs the pickle's stack
machine on sizes instead of objects: every value counts as the values it holds, once per place it
is put (a memo fetch counts the whole of what it fetches), and a bytearray may not be made from a
number.
"""

from __future__ import annotations

import io
import pickletools
import warnings
from typing import IO, Any

__all__ = ["MOST_VALUES", "archive_problem", "pickle_problem"]

#: the most values a pickle's stack machine may push, the parts of what it pushes counted (about
#: the values its data unfolds into when walked as a tree, ``compressdrop.torchload``'s bound)
MOST_VALUES = 10_000_000

_MEMO_PUT = ("PUT", "BINPUT", "LONG_BINPUT")
_MEMO_GET = ("GET", "BINGET", "LONG_BINGET")
_MUTATE = ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD")
_MARK = object()
_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's legacy magic number


class _Value:
    """A value on the machine's stack: how many values it holds (itself included), and what it
    is where that matters (a global's name, a string, a tuple's items; ``"int"`` for the shared
    value of every number)."""

    __slots__ = ("size", "what")

    def __init__(self, size: int, what: Any = None) -> None:
        self.size, self.what = size, what


def pickle_problem(stream: IO[bytes] | bytes, most: int = MOST_VALUES) -> str | None:
    """What makes the pickle at the start of ``stream`` unbounded to unpickle, or None (also for
    a stream that is no pickle, or a damaged one: the unpickler fails on it and says so). A
    stream is read up to its pickle's ``STOP``."""
    with warnings.catch_warnings():  # a damaged string's escapes: the unpickler's to report
        warnings.simplefilter("ignore")
        return _problem(io.BytesIO(stream) if isinstance(stream, bytes) else stream, most)


def _problem(stream: IO[bytes], most: int) -> str | None:
    stack: list[Any] = []
    memo: dict[int, _Value] = {}
    pushed = 0
    try:
        for op, arg, _ in pickletools.genops(stream):
            name = op.name
            if name in _MEMO_PUT or name == "MEMOIZE":
                memo[len(memo) if name == "MEMOIZE" else int(arg or 0)] = stack[-1]
                continue
            if name in _MEMO_GET or name == "DUP":
                new = memo[int(arg or 0)] if name != "DUP" else stack[-1]
                stack.append(new)
                pushed += new.size
            elif name in _LEAVES:  # a number, None, a boolean: nothing popped
                stack.append(_INT if isinstance(arg, int) and name not in _NO_INT else _LEAF)
                pushed += 1
            elif name in _MUTATE:  # the container stays itself: what a memo holds of it grows too
                items = _pop(name, stack)
                if items[0] in (_INT, _LEAF):  # (a crafted stream: not the shared leaves' size)
                    items[0] = _Value(1)
                items[0].size += sum(v.size for v in items[1:])
                stack.append(items[0])
            else:
                items = _pop(name, stack)
                bytearray_ = name == "REDUCE" and items[0].what == ("builtins", "bytearray")
                if bytearray_ and isinstance(items[1].what, tuple) and _INT in items[1].what:
                    return "it makes a bytearray from a number (that many zero bytes)"
                size = 1 + sum(v.size for v in items)
                for is_mark in _SHAPES[name][2]:
                    stack.append(_MARK if is_mark else _Value(size, _what(name, arg, items)))
                    pushed += 0 if is_mark else size
            if pushed > most:
                return (
                    f"its data unfolds into more than {most:,} values (parts shared by many "
                    "containers): reading it would not end"
                )
    except (ValueError, KeyError, IndexError, TypeError):  # the unpickler fails on it too
        return None  # (and says it is corrupt)
    return None


def _shape(op: Any) -> tuple[bool, int, tuple[bool, ...]]:
    """An opcode's effect on the stack: whether it pops down to a mark, how many values it
    pops below that (or without one), and whether each value it pushes is a mark."""
    before = [s.name for s in op.stack_before]
    keep = before.index("mark") if "mark" in before else len(before)
    return "mark" in before, keep, tuple(s.name == "mark" for s in op.stack_after)


_SHAPES = {op.name: _shape(op) for op in pickletools.opcodes}
# opcodes that push one number, None or a boolean and pop nothing; their values are shared
_LEAVES = {
    *("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"),
    *("NONE", "NEWTRUE", "NEWFALSE"),
}
_NO_INT = {"FLOAT", "BINFLOAT"}  # (an INT of 00 or 01 is a boolean in protocol 0: still a number)
_INT, _LEAF = _Value(1, "int"), _Value(1)


def _pop(name: str, stack: list[Any]) -> list[Any]:
    """The values opcode ``name`` takes from ``stack`` (marks left out), taken off it."""
    to_mark, keep, _ = _SHAPES[name]
    items: list[Any] = []
    if to_mark:
        i = len(stack) - 1
        while stack[i] is not _MARK:
            i -= 1
        items = stack[i + 1 :]
        del stack[i:]
    if keep:
        items = stack[-keep:] + items
        del stack[-keep:]
    return items


def _what(name: str, arg: Any, items: list[Any]) -> Any:
    """What a pushed value is, where the check needs it: a global's module and name, a string,
    a tuple's items."""
    if name in ("GLOBAL", "INST"):
        return tuple(arg.split(" ", 1))
    if name == "STACK_GLOBAL":
        return (items[0].what, items[1].what)
    if name.startswith("TUPLE") or name == "EMPTY_TUPLE":
        return tuple(items)
    return arg if isinstance(arg, str) else None


def archive_problem(src: IO[bytes] | bytes) -> str | None:
    """:func:`pickle_problem` of what ``torch.load`` unpickles from a ``torch.save`` file (an
    open binary file, read from its start, or the file's bytes): a zip archive's ``data.pkl``
    (read through torch's own zip reader), or the pickles at the start of a file of the legacy
    format; None for a file that is neither."""
    import torch

    f: IO[bytes] = io.BytesIO(src) if isinstance(src, bytes) else src
    f.seek(0)
    try:
        reader = torch._C.PyTorchFileReader(f)
    except RuntimeError:  # not a zip archive: the legacy format's pickles, one after another
        f.seek(0)
        if f.read(len(_LEGACY)) != _LEGACY:
            return None  # neither: torch.load says what is wrong
        f.seek(0)
        for _ in range(5):  # magic number, protocol, system info, the data, storage keys
            if problem := pickle_problem(f):
                return problem
        return None
    records = reader.get_all_records()
    return pickle_problem(reader.get_record("data.pkl")) if "data.pkl" in records else None
