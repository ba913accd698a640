"""Typed recipes: dataclasses that read YAML files and `key=value` overrides, and check themselves.

A recipe is a (nested) dataclass. Field annotations are the schema; `field(metadata=...)` adds help
text and generic checks::

    @dataclass
    class DecodeConfig:
        steps: int = field(default=128, metadata={"help": "denoising steps S", "min": 1})
        sampler: Literal["conv", "topk", "llada"] = "conv"
        top_k: int | None = field(default=20, metadata={"min": 1})

        def validate(self):            # optional; keys are relative to this object
            if self.top_k is not None and self.top_k > 1000:
                raise ConfigError("must be <= 1000", key="top_k")

    @dataclass
    class GenerateRecipe:
        model: str = "GSAI-ML/LLaDA-8B-Instruct"
        decode: DecodeConfig = field(default_factory=DecodeConfig)

    cfg = load_recipe(GenerateRecipe, "recipes/generate-gsm8k.yaml", ["decode.steps=64"])

Supported annotations: int, float (an int is promoted), bool (real bools, or the strings
"true"/"false"), str (ints and floats from YAML are turned into strings), `X | None`, other unions
(first arm that fits), `Literal[...]`, `list[X]`, `dict[str, X]`, `tuple[X, ...]`, nested dataclasses,
Enum (by value or name), pathlib.Path, Any.
Metadata keys: "help" (text), "choices" (allowed values), "min" / "max" (inclusive bounds); for lists
the checks apply to each element; None passes them.

Every problem raises `difflm.errors.ConfigError` whose message starts with the dotted key
("decode.top_k: must be >= 1, got 0"). Importable without typer or rich: stdlib + yaml only.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import pathlib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

from difflm.errors import ConfigError, first_line

__all__ = [
    "from_dict",
    "check",
    "check_field_metadata",
    "parse_overrides",
    "merge",
    "load_recipe",
    "load_yaml",
    "to_dict",
    "dump_yaml",
    "save_resolved",
]

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# YAML: safe_load semantics, with three fixes that matter for recipes: `1e-5` is a float (PyYAML's
# YAML 1.1 rules read it as a string), dates stay strings, and a key given twice in one mapping is an
# error (PyYAML keeps the last value silently; the YAML spec requires unique keys).


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first given on line {first.start_mark.line + 1}); "
                        "each key may appear once per mapping",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, _FLOAT_RE if tag == "tag:yaml.org,2002:float" else regexp)
        for tag, regexp in resolvers
        if tag != "tag:yaml.org,2002:timestamp"
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# ---------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build a `cls` instance from a plain (nested) dict, checking every value against the field
    annotations, then run the metadata checks and `validate()` of it and of every nested dataclass.

    `prefix` is the dotted path of `data` inside a larger recipe ("decode."), used in messages.
    Fields absent from `data` keep their defaults; a field without default must be present.
    """
    obj = _build(cls, {} if data is None else data, prefix)
    check(obj, prefix)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and not prefix.endswith(".") else f"{prefix}{name}"


def _build(cls: type[T], data: Any, prefix: str) -> T:
    where = prefix.rstrip(".")
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of keys, got {_show(data)}", key=where or None)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            full = _join(prefix, str(key))
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            err = ConfigError(f"unknown key '{full}'{hint}; allowed: {', '.join(fields)}")
            err.key = full
            raise err
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints.get(name, Any), data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("required key is missing", key=key)
    return cls(**kwargs)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return "a mapping" if dataclasses.is_dataclass(tp) else tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return str(tp)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; return it (converted where lossless)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, key)
    if origin is Literal:
        return _convert_literal(args, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_sequence(tp, origin, args, value, key)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _bad(tp, value, key)
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, _join(key, str(k))) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key + ".")
    if tp in _SCALARS:
        return _convert_scalar(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _bad(tp, value, key)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _bad(tp, value, key)
    return value  # an annotation we do not understand: accept as is


def _bad(tp: Any, value: Any, key: str) -> ConfigError:
    return ConfigError(f"expected {_type_name(tp)}, got {_show(value)}", key=key)


def _convert_union(tp: Any, args: tuple, value: Any, key: str) -> Any:
    """`X | Y | None`: None only where the union allows it, else the first arm that takes the value."""
    if value is None:
        if type(None) in args:
            return None
        raise _bad(tp, value, key)
    arms = [a for a in args if a is not type(None)]
    for arm in arms:
        try:
            return _convert(arm, value, key)
        except ConfigError:
            if len(arms) == 1:  # `X | None`: the arm's own message is the clearest
                raise
    raise _bad(tp, value, key)


def _convert_literal(args: tuple, value: Any, key: str) -> Any:
    """`Literal[...]`: one of the choices, of the same type; else name them (and the closest)."""
    for choice in args:
        if value == choice and type(value) is type(choice):
            return choice
    close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"must be one of {', '.join(map(repr, args))}, got {_show(value)}{hint}", key=key)


def _convert_sequence(tp: Any, origin: Any, args: tuple, value: Any, key: str) -> list | tuple:
    """`list[X]`, `tuple[X, ...]` and fixed-length `tuple[X, Y]`: each item checked, keyed `key[i]`."""
    if not isinstance(value, (list, tuple)):
        raise _bad(tp, value, key)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(f"expected {len(args)} items, got {_show(value)}", key=key)
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if (origin or tp) is tuple else items


def _convert_scalar(tp: type, value: Any, key: str) -> Any:
    """bool, int, float, str: never a bool for a number; strings only where they read unambiguously."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if number:
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value.replace("_", ""))
    elif tp is str:
        if isinstance(value, str):
            return value
        if number:
            return str(value)  # `name: 2024` in YAML, `tag=7` on the command line
    raise _bad(tp, value, key)


_SCALARS = (bool, int, float, str)


def _convert_enum(tp: type[enum.Enum], value: Any, key: str) -> enum.Enum:
    """An Enum member, given as the member, its value or its name."""
    if isinstance(value, tp):
        return value
    for member in tp:
        if value == member.value or value == member.name:
            return member
    raise ConfigError(f"must be one of {', '.join(repr(m.value) for m in tp)}, got {_show(value)}", key=key)


# ---------------------------------------------------------------------------------------------
# checks


def check(obj: Any, prefix: str = "") -> None:
    """Run the metadata checks ("choices", "min", "max") and `validate()` on a dataclass instance
    and, first, on every nested dataclass instance. `from_dict` calls it; call it yourself after
    building or changing a recipe in Python.

    `validate()` raises `ConfigError(msg, key=...)` with keys relative to its own object (a plain
    ValueError is accepted too); they are re-raised with the dotted prefix ("decode.top_k: ...").
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(prefix, f.name)
        nested = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(nested):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                check(item, key if item is value else f"{key}[{i}]")
        _check_metadata(f.metadata, value, key)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            if not prefix:
                raise
            if e.key:
                message = str(e)[len(e.key) + 2 :]
                raise ConfigError(message, key=_join(prefix, e.key)) from e
            raise ConfigError(str(e), key=prefix.rstrip(".")) from e
        except ValueError as e:
            raise ConfigError(str(e), key=prefix.rstrip(".") or None) from e


def check_field_metadata(obj: Any) -> None:
    """The metadata checks ("choices", "min", "max") of one dataclass instance's own fields (keys = field
    names), as `check` runs them: for a `validate()` that must also hold when called directly."""
    for f in dataclasses.fields(obj):
        _check_metadata(f.metadata, getattr(obj, f.name), f.name)


def _check_metadata(meta: Mapping[str, Any], value: Any, key: str) -> None:
    if value is None or not meta:
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_metadata(meta, item, f"{key}[{i}]")
        return
    shown = value.value if isinstance(value, enum.Enum) else value
    choices = meta.get("choices")
    if choices is not None and shown not in choices and value not in choices:
        raise ConfigError(f"must be one of {', '.join(map(repr, choices))}, got {_show(shown)}", key=key)
    if "min" in meta and meta["min"] is not None and value < meta["min"]:
        raise ConfigError(f"must be >= {meta['min']}, got {_show(value)}", key=key)
    if "max" in meta and meta["max"] is not None and value > meta["max"]:
        raise ConfigError(f"must be <= {meta['max']}, got {_show(value)}", key=key)


# ---------------------------------------------------------------------------------------------
# overrides, files, merging


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """Turn `["decode.steps=64", "model.name=foo"]` into `{"decode": {"steps": 64}, "model": ...}`.

    Values are read as YAML (64 -> int, 0.5 and 1e-5 -> float, true -> bool, null -> None,
    [1, 2] -> list, anything else -> str; `key=` is the empty string). The last of repeated keys wins.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or not all(p.strip() for p in parts):
            raise ConfigError(f"bad override {item!r}: expected KEY=VALUE, e.g. decode.steps=64")
        if text.strip() == "":
            value: Any = ""
        else:
            try:
                value = _yaml_load(text)
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or first_line(e)
                raise ConfigError(
                    f"bad value in override {item!r}: {problem}; quote it to pass a string, e.g. "
                    f"{key}='\"...\"'"
                ) from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with {'.'.join(parts[: depth + 1])}=...")
        node[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested dicts into a new one; values of `update` win, mappings merge."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{"decode.steps": 64, "seed": None}` -> `{"decode": {"steps": 64}}`: dotted keys nest, None drops."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            value = _nest(value)
            if not value:
                continue
        *parents, last = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
            value = merge(node[last], value)
        node[last] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file: a YAML mapping (an empty file is `{}`). Errors name the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe file {path}: {e.strerror or e}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_recipe(
    cls: type[T],
    path: str | os.PathLike | None,
    overrides: Iterable[str] | None = (),
    cli_values: Mapping[str, Any] | None = None,
) -> T:
    """Resolve a recipe: defaults <- YAML file `path` (optional) <- `cli_values` <- `overrides`.

    `cli_values` holds the CLI options the user gave, nested (`{"decode": {"steps": 64}}`) or
    dotted (`{"decode.steps": 64}`); None values mean "not given" and are dropped.
    `overrides` are `KEY=VALUE` strings (see `parse_overrides`); they win over everything.
    """
    data = load_yaml(path) if path is not None else {}
    data = merge(data, _nest(cli_values or {}))
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


# ---------------------------------------------------------------------------------------------
# dataclass -> dict / YAML


def to_dict(obj: Any) -> Any:
    """A dataclass (or list/dict of them) as plain YAML-friendly data: enums by value, paths and
    other unknown objects as strings, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return to_dict(obj.value)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def dump_yaml(obj: Any) -> str:
    """The recipe as YAML text, in field order; `load_recipe` reads it back to an equal recipe."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True, default_flow_style=False)


def save_resolved(obj: Any, path: str | os.PathLike) -> None:
    """Write `dump_yaml(obj)` to `path` atomically (see `difflm.io.atomic_write_text`): a crash never
    leaves a half-written config behind."""
    from difflm.io import atomic_write_text

    atomic_write_text(path, dump_yaml(obj))
