"""Turning a failed decode into one message: the path of the bad key, what was wrong, what would do.

Every scenario error reads ``WHERE: PATH: REASON``: ``basic.toml:
guest.workload[1].wieght: unknown key; did you mean 'weight'? known:
['region', 'theta', 'weight', 'write_frac']``. The words are the same
everywhere: "expected a number / an integer / a string / true or false /
a table / an array, got ...", "must be >= 0, got -1", "must be one of
[...], got ...", and "did you mean" whenever a close name exists
(``difflib``).
"""
from __future__ import annotations

import enum
import re
import typing
from typing import Any, Iterable, Sequence, Union

import msgspec

from ..errors import ConfigError

__all__ = ["SchemaError", "decode", "join_path", "suggest", "did_you_mean", "unknown_name", "known_list", "with_known",
           "split_where", "describe"]

_MISSING = object()


class SchemaError(ConfigError):
    """A scenario value that does not fit the schema; ``path`` is the dotted key (``guest.workload[1].weight``)."""

    def __init__(self, path: str, reason: str, where: str = "") -> None:
        self.path = path
        self.reason = reason
        self.where = where
        text = f"{path}: {reason}" if path else reason
        super().__init__(f"{where}: {text}" if where else text)


def join_path(base: str, *parts: str | int) -> str:
    out = base
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("["):
            out += part
        else:
            out = f"{out}.{part}" if out else part
    return out


def suggest(word: object, known: Iterable[str], n: int = 3) -> list[str]:
    """The known names closest to ``word`` (difflib, cutoff 0.6), best first."""
    if not isinstance(word, str):
        return []
    import difflib   # only when a message is being written
    known = [str(k) for k in known]
    lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=0.6)
    return [lower[c] for c in close]


def did_you_mean(word: object, known: Iterable[str]) -> str:
    """``"; did you mean 'weight'?"`` or ``""``."""
    close = suggest(word, known)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def known_list(known: Iterable[str]) -> str:
    return repr(sorted(str(k) for k in known))


def with_known(head: str, name: object, known: Iterable[str]) -> str:
    """``head`` + a suggestion for ``name`` + the known names: ``"X; did you mean 'a'? known: [...]"``."""
    known = list(known)
    hint = did_you_mean(name, known)
    return f"{head}{hint} known: {known_list(known)}" if hint else f"{head}; known: {known_list(known)}"


def unknown_name(what: str, name: object, known: Iterable[str]) -> str:
    """``"unknown victim policy 'clok'; did you mean 'clock'? known: ['clock', 'random']"``."""
    return with_known(f"unknown {what} {name!r}", name, known)


def split_where(where: str, table: str) -> str:
    """The file/variant part of an older ``where`` that ended with the table (``"x.toml: [locks]"`` -> ``"x.toml"``)."""
    for suffix in (f": [{table}]", f": {table}", f"[{table}]", table):
        if where.endswith(suffix):
            return where[: -len(suffix)].rstrip(": ")
    return where


def describe(value: object) -> str:
    """``"a string 'fast'"``: how a message names a value it refuses."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "an array"}
    return f"{kinds.get(type(value), type(value).__name__)} {value!r}"


def decode(cls: type, data: Any, *, path: str = "", where: str = "") -> Any:
    """``data`` (parsed TOML or JSON) as ``cls``, or a ``SchemaError`` naming the exact key and the value."""
    try:
        return msgspec.convert(data, cls, strict=True)
    except msgspec.ValidationError as exc:
        raise explain(str(exc), cls, data, path=path, where=where) from None


# --- explaining msgspec's errors --------------------------------------------------------

_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<at>[^`]*)`$", re.S)
_TOKEN = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "object": "a table", "array": "an array", "null": "nothing"}
_GOT_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
              "object": "a table", "array": "an array"}


def explain(message: str, cls: type, data: Any, *, path: str = "", where: str = "") -> SchemaError:
    m = _AT.match(message)
    msg, at = (m["msg"], m["at"]) if m else (message, "")
    tokens: list[str | int] = [t[0] if t[0] else int(t[1]) for t in _TOKEN.findall(at)]
    here = join_path(path, *tokens)

    got = re.match(r"Object contains unknown field `(.*)`$", msg)
    if got:
        key = got[1]
        known = _fields_at(cls, data, tokens)
        what = "unknown table" if not tokens and not path else "unknown key"
        if known is None:
            return SchemaError(join_path(here, key), what, where)
        return SchemaError(join_path(here, key), with_known(what, key, known), where)
    got = re.match(r"Object missing required field `(.*)`$", msg)
    if got:
        key = got[1]
        tags = _tags_at(cls, data, tokens)
        if tags is not None and tags[0] == key:
            return SchemaError(join_path(here, key), f"missing; one of {known_list(tags[1])}", where)
        return SchemaError(join_path(here, key), "missing (required)", where)
    value = _value_at(data, tokens)
    shown = "" if value is _MISSING else f" {value!r}"
    got = re.match(r"Invalid (?:enum )?value (.*)$", msg)
    if got:
        choices = _choices_at(cls, data, tokens)
        if choices:
            return SchemaError(here, f"must be one of {choices!r}, got {value!r}{did_you_mean(value, choices)}", where)
        return SchemaError(here, f"invalid value{shown}", where)
    got = re.match(r"Expected `([^`]*)`, got `([^`]*)`$", msg)
    if got:
        want = " or ".join(_TYPE_WORDS.get(t, t) for t in got[1].split(" | ") if t != "null")
        return SchemaError(here, f"expected {want}, got {_GOT_WORDS.get(got[2], got[2])}{shown}", where)
    got = re.match(r"Expected `[^`]*` (>=|>|<=|<) (\S+)$", msg)
    if got:
        bound = float(got[2])
        bound_s = f"{bound:g}" if bound != int(bound) or abs(bound) >= 1e16 else str(int(bound))
        return SchemaError(here, f"must be {got[1]} {bound_s}, got{shown}", where)
    got = re.match(r"Expected `[^`]*` that's a multiple of (\S+)$", msg)
    if got:
        return SchemaError(here, f"must be a multiple of {got[1]}, got{shown}", where)
    got = re.match(r"Expected `array` of length (>=|<=) (\d+)$", msg)
    if got:
        return SchemaError(here, "must not be empty" if (got[1], got[2]) == (">=", "1") else
                           f"expected an array of length {got[1]} {got[2]}, got{shown}", where)
    # A check of the table itself (``__post_init__``): its message may start with a key under ``here``.
    rel = re.match(r"^([A-Za-z_][\w-]*(?:\[\d+\])*(?:\.[A-Za-z_][\w-]*(?:\[\d+\])*)*): (.*)$", msg, re.S)
    if rel:
        return SchemaError(join_path(here, *_split_rel(rel[1])), rel[2], where)
    return SchemaError(here, msg, where)


def _split_rel(rel: str) -> list[str | int]:
    return [t[0] if t[0] else int(t[1]) for t in _TOKEN.findall("." + rel)]


def _value_at(data: Any, tokens: Sequence[str | int]) -> Any:
    for tok in tokens:
        try:
            data = data[tok]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return data


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _options(tp: Any) -> list[Any]:
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is Union or type(tp).__name__ == "UnionType":
        return [_strip(a) for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _struct_for(tp: Any, data: Any) -> Any:
    """The struct type among ``tp``'s options that ``data`` is decoded as (a tagged union: by its tag)."""
    structs = [o for o in _options(tp) if isinstance(o, type) and issubclass(o, msgspec.Struct)]
    if len(structs) == 1:
        return structs[0]
    for s in structs:
        cfg = s.__struct_config__
        if cfg.tag_field and isinstance(data, dict) and data.get(cfg.tag_field) == cfg.tag:
            return s
    return None


def _type_at(cls: Any, data: Any, tokens: Sequence[str | int]) -> tuple[Any, Any]:
    tp = cls
    for tok in tokens:
        if isinstance(tok, int):
            seq = [o for o in _options(tp) if typing.get_origin(o) in (list, tuple)]
            if not seq:
                return None, None
            tp = typing.get_args(seq[0])[0]
            data = _value_at(data, [tok])
            continue
        struct = _struct_for(tp, data)
        if struct is None:
            return None, None
        field = next((f for f in msgspec.structs.fields(struct) if f.encode_name == tok), None)
        if field is None:
            return None, None
        tp = field.type
        data = _value_at(data, [tok])
    return tp, data


def _fields_at(cls: Any, data: Any, tokens: Sequence[str | int]) -> list[str] | None:
    tp, value = _type_at(cls, data, tokens)
    struct = _struct_for(tp, value) if tp is not None else None
    if struct is None:
        return None
    return sorted(f.encode_name for f in msgspec.structs.fields(struct))


def _tags_at(cls: Any, data: Any, tokens: Sequence[str | int]) -> tuple[str, list[str]] | None:
    """(tag field, tags) when ``tokens`` lead to a tagged union."""
    tp, _ = _type_at(cls, data, tokens)
    structs = [o for o in _options(tp) if isinstance(o, type) and issubclass(o, msgspec.Struct)]
    fields = {s.__struct_config__.tag_field for s in structs}
    if len(structs) < 2 or len(fields) != 1 or None in fields:
        return None
    return fields.pop(), [str(s.__struct_config__.tag) for s in structs]


def _choices_at(cls: Any, data: Any, tokens: Sequence[str | int]) -> list[str] | None:
    if tokens and isinstance(tokens[-1], str):
        tags = _tags_at(cls, data, tokens[:-1])
        if tags is not None and tags[0] == tokens[-1]:
            return tags[1]
    tp, _ = _type_at(cls, data, tokens)
    out: list[str] = []
    for o in _options(tp):
        if typing.get_origin(o) is typing.Literal:
            out += [str(a) for a in typing.get_args(o)]
        elif isinstance(o, type) and issubclass(o, enum.Enum):
            out += [str(m.value) for m in o]
    return out or None
