"""A ``.pt2`` archive's JSON checked field by field against torch's own schema.

``torch.export.load`` turns the graph's JSON into the dataclasses of
``torch._export.serde.schema`` without checking a value's type (a name given as a list or a
number, a target given as a dict reach the code that builds the graph as they are) and ignoring
keys it does not know. :func:`check_schema` walks the JSON along those dataclasses' type hints:
every key must be a field, every value of the declared type (an ``int`` within 64 bits, an enum
one of its values, a union exactly one of its members), and every string is checked by what
the field means: a name must be a dotted identifier (FX pastes names into the Python source it
generates and runs), a node's target one of the calls a program may make, a shape expression
small arithmetic, a pytree spec plain containers. A string field this module does not know (a
later torch's) must look like a name.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from torch._export.serde import schema
from torch._export.serde.union import _Union

__all__ = ["check_schema"]

#: a checker of one string: None where it is fine, else what is wrong with it
Check = Callable[[str], "str | None"]


def _matches(pattern: str, what: str, longest: int = 1000) -> Check:
    regex = re.compile(pattern)

    def check(value: str) -> str | None:
        if len(value) <= longest and regex.fullmatch(value):
            return None
        return f"{what}: {value[:80]!r}"

    return check


#: what a graph's names must be (FX pastes them into the source it generates and runs): dotted
#: identifiers (a module path's parts may be digits: nn.Sequential's "1.weight")
IDENT = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_NAME = _matches(IDENT.pattern, "a name is not an identifier")
# a parameter's or module's path: its parts may hold "-" too (torchvision's RegNet names its
# blocks "block1-0"), which FX writes quoted, getattr(self, "block1-0"), never as code
_PATH = _matches(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", "a module path is not dotted names")


def _TEXT(value: str) -> str | None:
    """Any text: torch keeps it as data (an op's string argument, a version, a stack trace)."""
    return None


_UNKNOWN = _matches(r"[A-Za-z0-9_.:-]*", "a field torch's schema adds holds more than a name", 200)
# an op's string argument or a string input ("tanh", "floor", "bij,bjk->bik", "reflect"): printable
# ASCII without quotes and backslashes (torch pastes a string input's value into the guard code it
# generates and runs, between single quotes)
_STRING = _matches(r"[ !#-&(-\[\]-~]*", "a string holds quotes, backslashes or line breaks")


def _refused(what: str) -> Check:
    return lambda value: what


def _fqn(value: str) -> str | None:
    """A module path, or "" (the root module's)."""
    return None if value == "" else _PATH(value)


def _argument(value: str) -> str | None:
    """An argument's name, or "" (a higher-order op's positional arguments)."""
    return None if value == "" else _NAME(value)


def _source_fns(value: str) -> str | None:
    """Node metadata ``source_fn_stack``: ``name,target`` items that torch looks up as
    attributes of ``torch``, ``operator`` or ``math``, or (``#namespace:op``) in a registry."""
    for item in value.split(";"):
        name, _, target = item.partition(",")
        if _NAME(name) or _NAME(target):
            return f"a node's source function is not a name: {item[:80]!r}"
    return None


def string_checks(target: Check, expr: Check, spec: Check) -> dict[tuple[str, str], Check]:
    """What each string field of the schema must be, keyed (class name, field name); ``target``,
    ``expr`` and ``spec`` check node targets, shape expressions and pytree specs."""
    names = [
        *("SymIntArgument.as_name", "SymFloatArgument.as_name", "SymBoolArgument.as_name"),
        *("TensorArgument.name", "TokenArgument.name", "GraphArgument.name"),
        *("Node.name", "InputToConstantInputSpec.name", "GradientToUserInputSpec.user_input_name"),
        *("UserInputMutationSpec.user_input_name", "ModuleCallSignature.forward_arg_names"),
        "NamedTupleDef.field_names",
    ]
    custom = _refused("it holds custom Python objects")
    compiled = _refused("it holds compiled code")
    checks: dict[tuple[str, str], Check] = {
        **{tuple(n.split(".")): _NAME for n in names},  # type: ignore[misc]
        **{
            tuple(n.split(".")): _PATH  # type: ignore[misc]
            for n in (
                *("InputToParameterSpec.parameter_name", "InputToBufferSpec.buffer_name"),
                *(
                    "InputToTensorConstantSpec.tensor_constant_name",
                    "BufferMutationSpec.buffer_name",
                ),
                *("ParameterMutationSpec.parameter_name", "GradientToParameterSpec.parameter_name"),
            )
        },
        ("ModuleCallEntry", "fqn"): _fqn,
        ("NamedArgument", "name"): _argument,
        ("Node", "target"): target,
        ("Argument", "as_operator"): target,
        ("SymExpr", "expr_str"): expr,
        ("ModuleCallSignature", "in_spec"): spec,
        ("ModuleCallSignature", "out_spec"): spec,
        ("Device", "type"): _matches(r"[a-z_]+", "a device is not a device type", 40),
        ("Argument", "as_string"): _STRING,
        ("Argument", "as_strings"): _STRING,
        ("ConstantValue", "as_string"): _STRING,
        ("Node", "metadata"): _TEXT,  # a stack trace, a module path: kept as text (but _METADATA)
        ("GraphModule", "metadata"): _TEXT,
        ("ExportedProgram", "torch_version"): _TEXT,
        ("PayloadMeta", "path_name"): _TEXT,  # must name a payload record: check_pt2_archive
        ("ExportedProgram", "guards_code"): _TEXT,  # dropped after loading (programs/load.py)
        ("ExportedProgram", "verifiers"): _matches(r"[A-Z_]+", "a verifier is not a dialect", 40),
        ("CustomObjArgument", "name"): custom,
        ("CustomObjArgument", "class_fqn"): custom,
        ("InputToCustomObjSpec", "custom_obj_name"): custom,
        ("AOTInductorModelPickleData", "library_basename"): compiled,
        ("ExternKernelNode", "name"): compiled,
    }
    return checks


# what the keys of each dict field must be (all other dicts: node metadata, an op's keyword
# arguments: text, torch reads known keys only)
_KEYS: dict[tuple[str, str], Check] = {
    **{("Graph", f): _NAME for f in ("tensor_values", "sym_int_values", "sym_bool_values")},
    ("Graph", "sym_float_values"): _NAME,
    ("Graph", "custom_obj_values"): _refused("it holds custom Python objects"),
    ("GraphModule", "treespec_namedtuple_fields"): _NAME,
    ("ExportedProgram", "opset_version"): _NAME,
    ("ExportedProgram", "range_constraints"): _NAME,
    ("PayloadConfig", "config"): _PATH,
}
# node metadata whose values torch does more with than keep them as text
_METADATA = {"source_fn_stack": _source_fns}
_INT64 = 1 << 63


def check_schema(doc: Any, root: type, strings: dict[tuple[str, str], Check]) -> str | None:
    """What is wrong with the JSON ``doc`` read as the schema dataclass ``root``, or None.

    Args:
        doc: the parsed JSON (``models/<name>.json``: ``schema.ExportedProgram``; a payload
            table: ``schema.PayloadConfig``).
        root: the dataclass it must be.
        strings: what each string field must be (:func:`string_checks`).

    Returns:
        None where every value is what its field declares, else the first problem found.
    """
    stack: list[tuple[Any, Any, tuple[str, str]]] = [(doc, root, ("", ""))]
    while stack:
        value, kind, field = stack.pop()
        if wrong := _one(value, kind, field, strings, stack):
            return wrong
    return None


def _one(
    value: Any,
    kind: Any,
    field: tuple[str, str],
    strings: dict[tuple[str, str], Check],
    stack: list[tuple[Any, Any, tuple[str, str]]],
) -> str | None:
    """Check ``value`` as a ``kind`` (the field it sits in names its checks); push what it
    holds onto ``stack``. Returns what is wrong, or None."""
    where = ".".join(field).strip(".") or "the archive's JSON"
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) != 1:
            return f"{where} has a type this check does not know ({kind})"
        kind, origin, args = members[0], typing.get_origin(members[0]), typing.get_args(members[0])
    if origin is list:
        if not isinstance(value, list):
            return f"{where} is not a list"
        stack.extend((v, args[0], field) for v in value)
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return f"{where} is not a table"
        keys = _KEYS.get(field, _TEXT)
        for k, v in value.items():
            if wrong := keys(k):
                return wrong
            known = _METADATA.get(k) if field[1] == "metadata" and isinstance(v, str) else None
            if known and (wrong := known(v)):
                return wrong
            stack.append((v, args[1], field))
        return None
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _dataclass(value, kind, where, stack)
    if isinstance(kind, type) and issubclass(kind, enum.IntEnum):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (
            None if ok and value in {m.value for m in kind} else f"{where} is not a {kind.__name__}"
        )
    if kind is bool:
        return None if isinstance(value, bool) else f"{where} is not true or false"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64
        return None if ok else f"{where} is not a 64-bit integer"
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok and abs(value) < 1 << 1024 else f"{where} is not a number"
    if kind is str:
        if not isinstance(value, str):
            return f"{where} is not a string"
        wrong = strings.get(field, _UNKNOWN)(value)
        return f"{wrong} ({where})" if wrong else None
    return f"{where} has a type this check does not know ({kind})"


def _dataclass(value: Any, kind: type, where: str, stack: list) -> str | None:
    """A schema dataclass: a table of its fields (a union: exactly one of them); push each."""
    if not isinstance(value, dict):
        return f"{where} is not a table ({kind.__name__})"
    fields = {f.name: f for f in dataclasses.fields(kind)}
    stray = [k for k in value if k not in fields]
    if stray:
        return f"{where} has a field torch's schema does not: {str(stray[0])[:80]!r}"
    if issubclass(kind, _Union):
        if len(value) != 1:
            return f"{where} is not one of {kind.__name__}'s kinds"
    else:
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in value]
        if missing:
            return f"{where} lacks {kind.__name__}.{missing[0]}"
    hints = _hints(kind)
    stack.extend((v, hints[k], (kind.__name__, k)) for k, v in value.items())
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(kind: type) -> dict[str, Any]:
    """A schema dataclass's field types (``Annotated`` removed, forward references resolved)."""
    if kind not in _HINTS:
        _HINTS[kind] = typing.get_type_hints(kind, globalns=vars(schema))
    return _HINTS[kind]
