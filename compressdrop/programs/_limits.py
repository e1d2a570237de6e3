"""Bounds on what a ``.pt2``'s graph may make Python compute while it loads (used by
:mod:`.safety`): a tower of powers in a shape expression, or chained squarings in the graph's
symbolic arithmetic, ran for as long as the file wished; a payload tensor that views more than
its record's bytes. Also the JSON walker both modules use."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch._export.serde import schema

__all__: list[str] = []  # internal: safety.py uses them


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _small_exponent(tokens: list[str]) -> bool:
    """Whether ``Pow(base, exponent)`` (its tokens from the "(") has an exponent of at most 64:
    a number, ``Integer(n)``, or a symbol, which sympy does not evaluate."""
    depth, start = 0, None
    for i, tok in enumerate(tokens):
        depth += (tok == "(") - (tok == ")")
        if tok == "," and depth == 1 and start is None:
            start = i + 1
        elif depth == 0:
            exponent = (
                [t for t in tokens[start:i] if t not in ("Integer", "(", ")")] if start else []
            )
            if len(exponent) == 1 and exponent[0].isdigit():
                return int(exponent[0]) <= 64
            return exponent[:1] == ["Symbol"] or (len(exponent) == 1 and exponent[0][0] == "'")
    return False


# how many bits an integer result of each arithmetic call may have, from its inputs' ("sum": a
# product; "max1": a sum; "max": no growth)
_GROWS = {"_operator.mul": "sum", "_operator.add": "max1", "_operator.sub": "max1"}


def _bounded_arithmetic(doc: Any) -> bool:
    """Whether no integer the graph computes (its symbolic shape arithmetic, which loading runs
    once) can exceed 4,096 bits: 40 chained squarings hung the load in Python's big integers."""
    bits: dict[str, int] = {}
    for nodes in (v for k, v in _walk(doc) if k == "nodes" and isinstance(v, list)):
        for node in nodes:
            target = node.get("target") if isinstance(node, dict) else None
            if not (isinstance(target, str) and target.startswith(("_operator.", "math."))):
                continue
            sizes = []
            for arg in ((i or {}).get("arg") or {} for i in node.get("inputs") or []):
                sym = arg.get("as_sym_int") or {}
                if "as_name" in sym:
                    sizes.append(bits.get(sym["as_name"], 64))
                for literal in (arg.get("as_int"), sym.get("as_int")):
                    if isinstance(literal, int):
                        sizes.append(max(1, literal.bit_length()))
            rule = _GROWS.get(target, "max")
            out = sum(sizes) if rule == "sum" else max(sizes, default=64) + (rule == "max1")
            if out > 4096:
                return False
            for o in node.get("outputs") or []:
                name = ((o or {}).get("as_sym_int") or {}).get("as_name")
                if isinstance(name, str):
                    bits[name] = max(out, 64)
    return True


def _payload_problem(meta: dict[str, Any], stored: int) -> str | None:
    """What is wrong with a payload's tensor, which torch makes with ``as_strided`` over the
    ``stored`` bytes of its record from the table's device, sizes, strides and offset, or None:
    a device other than the CPU or CUDA (``meta``: a weight without its data); values but no
    bytes (torch fills an empty record with zeros of the size the table says); more values than
    the record holds, as for a ``.pt`` file (a 4-byte record declared ``[20000, 20000]`` with
    strides ``[0, 0]`` made a 1.6 GB tensor of one value, 6.7 GB once an export copied it); a
    negative or symbolic size, stride or offset; a last element past the record's end."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    device = (meta.get("device") or {}).get("type")
    if device not in ("cpu", "cuda"):
        return f"is on device {device!r}"
    sizes, strides = ([d.get("as_int") for d in meta.get(k) or []] for k in ("sizes", "strides"))
    offset = (meta.get("storage_offset") or {}).get("as_int")
    if not all(isinstance(v, int) for v in (offset, *sizes, *strides)):
        return "has a symbolic size, stride or offset"
    if min((offset, *sizes, *strides)) < 0:
        return "has a negative size, stride or offset"
    numel = math.prod(sizes)
    if numel == 0:
        return None  # no values: no bytes read
    if not stored:
        return f"has {numel} values but no bytes"
    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(schema.ScalarType(meta["dtype"]))
    if dtype is None or len(sizes) != len(strides):
        return "has no dtype or strides for its sizes"
    if numel * dtype.itemsize > stored:
        return (
            f"has {numel:,} values over a record of {stored:,} bytes (it views the same bytes "
            "many times)"
        )
    last = offset + sum((n - 1) * st for n, st in zip(sizes, strides))
    if (last + 1) * dtype.itemsize > stored:
        return f"reaches byte {(last + 1) * dtype.itemsize:,} of a record of {stored:,}"
    return None
