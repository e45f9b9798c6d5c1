"""A command's options, written once: a dataclass whose fields are `option(...)`s.

    @dataclass
    class EvalConfig:
        scoring: str = option("paper", choices=RULES, help="scoring rule")

From that one declaration come
- the command's argparse arguments (`add_arguments`), and the config back from them (`from_args`);
- the config from a mapping (`from_mapping`): a YAML file, a section of an experiment file, parsed
  `key=value` settings. Unknown keys and bad values are one-line `PolyalignError`s that name the key
  (with its place in the file) and the nearest valid key.

Types come from the annotations: `str`, `int`, `float`, `bool`, `X | None`, `list[str]` and `dict`.
A bool whose default is True becomes `--no-x`; a list is a comma list on the command line (or a
repeated flag, with `repeatable=True`) and a list or a comma string in YAML; a `dict` (a mapping,
checked by whoever reads it) has no command line: it must be declared with cli=False.

Why a small module of ours rather than simple_parsing, tyro or pydantic: those generate the parser
well, but their errors for a mapping are multi-line reports (pydantic's ValidationError, tyro's rich
panels) or argparse exits, and none offers our did-you-mean for a mistyped key inside a YAML section
(`unknown key eval.limt; did you mean 'limit'?`). Wrapping them to keep that contract would take
about as much code as this file, plus a dependency; argparse and dataclasses come with Python.

Options several commands share (`--model`, `--dtype`, ...) are written once at the end of this file.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from functools import lru_cache

from polyalign.errors import PolyalignError

_META = "polyalign"
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def option(default=dataclasses.MISSING, *, help: str, choices=None, flag: str | None = None,
           positional: bool = False, required: bool = False, metavar: str | None = None,
           repeatable: bool = False, cli: bool = True):
    """A dataclass field with what the CLI and the readers need to know about it.

    flag: the command-line name (default `--field-name`, or `--no-field-name` for a bool that is
    True by default); positional: an argument without a flag (a list takes any number); required:
    the command line must give it (the dataclass still has a default, for Python callers and
    experiment files that fill it themselves); repeatable: a list given as `--flag A --flag B`;
    cli=False: read from mappings only."""
    meta = {_META: {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag,
                    "positional": positional, "required": required, "metavar": metavar,
                    "repeatable": repeatable, "cli": cli}}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- what a field is
@dataclasses.dataclass(frozen=True)
class Spec:
    """One option as the generators see it."""
    name: str
    base: type                  # str, int, float or bool (the element type, for a list)
    optional: bool              # None allowed
    is_list: bool
    default: object
    help: str
    choices: tuple | None
    flag: str | None
    positional: bool
    required: bool
    metavar: str | None
    repeatable: bool
    cli: bool


def _type_of(hint) -> tuple[type, bool, bool]:
    """(element type, None allowed, is a list) of an annotation such as `int | None` or `list[str]`."""
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            raise TypeError(f"unsupported option type {hint!r}")
        hint, args = rest[0], typing.get_args(rest[0])
    if hint is dict or typing.get_origin(hint) is dict:
        return dict, optional, False
    if typing.get_origin(hint) is list:
        if args not in ((str,), (int,), (float,)):
            raise TypeError(f"unsupported list type {hint!r}")
        return args[0], optional, True
    if hint not in (str, int, float, bool):
        raise TypeError(f"unsupported option type {hint!r}")
    return hint, optional, False


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@lru_cache(maxsize=None)
def _specs(cls) -> tuple[Spec, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            continue       # a plain field: set from Python only
        base, optional, is_list = _type_of(hints[f.name])
        if base is dict and meta["cli"]:
            raise TypeError(f"{cls.__name__}.{f.name}: a dict option has no command line; declare it with cli=False")
        out.append(Spec(f.name, base, optional, is_list, _default(f), **meta))
    return tuple(out)


def specs(cls) -> tuple[Spec, ...]:
    """The options of a config dataclass, in field order."""
    return _specs(cls)


def spec(cls, name: str) -> Spec:
    """The option `name` of `cls`."""
    for s in _specs(cls):
        if s.name == name:
            return s
    raise KeyError(name)


def names(cls) -> list[str]:
    return [s.name for s in _specs(cls)]


def defaults(cls) -> dict:
    """{option name: default}, in field order."""
    return {s.name: copy.deepcopy(s.default) for s in _specs(cls)}


def flag_of(s: Spec) -> str:
    if s.flag:
        return s.flag
    stem = s.name.replace("_", "-")
    return f"--no-{stem}" if s.base is bool and not s.is_list and s.default is True else f"--{stem}"


# ----------------------------------------------------------------------------- the command line
def _comma_list(base: type):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [base(t) for t in items]
    parse.__name__ = f"comma list of {base.__name__}"
    return parse


def _help(s: Spec) -> str | None:
    text = s.help
    if (s.base is not bool and s.default not in (None, "", [], dataclasses.MISSING) and not s.positional
            and not s.required):
        shown = ",".join(map(str, s.default)) if isinstance(s.default, list) else s.default
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """The argparse arguments of every option of `cls`. Defaults stay with the dataclass: an option
    not given is absent from the parsed namespace (argparse.SUPPRESS), and `from_args` fills it."""
    for s in _specs(cls):
        if not s.cli:
            continue
        kw: dict = {"help": _help(s)}
        if s.metavar:
            kw["metavar"] = s.metavar
        if s.positional:
            if s.is_list:
                kw["nargs"] = "*"
            elif not s.required:
                kw["nargs"] = "?"
            kw["default"] = argparse.SUPPRESS
            if s.choices:
                kw["choices"] = list(s.choices)
            kw["type"] = s.base
            parser.add_argument(s.name, **kw)
            continue
        kw.update(dest=s.name, default=argparse.SUPPRESS)
        if s.base is bool and not s.is_list:
            kw["action"] = "store_false" if s.default is True else "store_true"
            kw.pop("metavar", None)
        else:
            if s.is_list and s.repeatable:
                kw["action"] = "append"
                kw["type"] = s.base
            elif s.is_list:
                kw["type"] = _comma_list(s.base)
            else:
                kw["type"] = s.base
            if s.choices and not s.is_list:
                kw["choices"] = list(s.choices)
            kw["required"] = s.required
        parser.add_argument(flag_of(s), **kw)


def from_args(cls, namespace: argparse.Namespace):
    """The config of parsed arguments: what the command line gave, the dataclass's defaults for the rest.
    A comma list's items are checked against its choices here (argparse checks single values)."""
    given = {s.name: getattr(namespace, s.name) for s in _specs(cls) if hasattr(namespace, s.name)}
    for s in _specs(cls):
        if s.name in given and s.is_list and s.choices:
            _check_choices(s, given[s.name], flag_of(s) if not s.positional else s.name)
    return cls(**given)


def given(namespace: argparse.Namespace, cls) -> set[str]:
    """The options the command line set (those it left out are absent from the namespace)."""
    return {s.name for s in _specs(cls) if hasattr(namespace, s.name)}


# ----------------------------------------------------------------------------- mappings
class ConfigError(PolyalignError):
    """A mapping that does not fit a config dataclass."""


class UnknownKey(ConfigError):
    def __init__(self, key: str, valid: list[str], where: str):
        self.key, self.valid, self.where = key, valid, where
        super().__init__(f"unknown key {where + '.' if where else ''}{key}{nearest(key, valid)}")


class BadValue(ConfigError):
    def __init__(self, key: str, location: str, problem: str, joiner: str = ": "):
        self.key, self.location, self.problem = key, location, problem
        super().__init__(f"{location}{joiner}{problem}")


def nearest(key, valid, cutoff: float = 0.5) -> str:
    """'; did you mean 'x'?' for the closest valid name, else the list of valid names."""
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(map(str, valid)))}"


def from_mapping(cls, mapping, where: str = "", *, base=None, keys=None, locate=None):
    """`base` (default: `cls()`) with the mapping's values set, each checked and converted by its
    field's type and choices. keys: the names allowed here (default: every option); where: the
    mapping's place, for messages (`eval` -> `unknown key eval.limt; did you mean 'limit'?`);
    locate(key): how a bad value's message names the key (default `where.key`)."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where or 'the settings'} must be a mapping, got {type(mapping).__name__}")
    by_name = {s.name: s for s in _specs(cls)}
    allowed = list(keys) if keys is not None else list(by_name)
    values = {}
    for key, value in mapping.items():
        key = str(key)
        if key not in allowed or key not in by_name:
            raise UnknownKey(key, allowed, where)
        location = locate(key) if locate else (f"{where}.{key}" if where else key)
        values[key] = convert(by_name[key], value, location)
    return dataclasses.replace(base if base is not None else cls(), **values)


def convert(s: Spec, value, location: str):
    """One value (from YAML, a key=value string or Python) as option `s` takes it."""
    if value is None:
        if s.optional:
            return None
        raise BadValue(s.name, location, f"expected {_noun(s)}, got None")
    if s.is_list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not value:
            raise BadValue(s.name, location, f"expected a list (a YAML list or a comma list), got {value!r}")
        out = [_scalar(s, v, location) for v in value]
    else:
        out = _scalar(s, value, location)
    _check_choices(s, out, location)
    return out


def _check_choices(s: Spec, value, location: str) -> None:
    if not s.choices:
        return
    for v in value if isinstance(value, list) else [value]:
        if v not in s.choices:
            near = difflib.get_close_matches(str(v), [str(c) for c in s.choices], n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise BadValue(s.name, location, f"must be one of {', '.join(map(str, s.choices))}, got {v!r}{hint}",
                           joiner=" ")


def _noun(s: Spec) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            dict: "a mapping"}[s.base]


def _scalar(s: Spec, value, location: str):
    bad = BadValue(s.name, location, f"expected {_noun(s)}, got {value!r}")
    if s.base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise bad
    if s.base is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise bad
    if isinstance(value, bool) or isinstance(value, (list, dict, tuple, set)):
        raise bad
    if s.base is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if s.base is float:
        return number
    if number != int(number):
        raise bad
    return int(number)


# ----------------------------------------------------------------------------- options several commands share
def model_option():
    return option("gemma-3-270m", help="HF id, local folder, or the embedded gemma-3-270m")


def dtype_option(help: str = "weights' dtype; auto: bf16 where the CPU/GPU runs it natively, else fp32 "
                             "(fp16 on a GPU without bf16)"):
    return option("auto", choices=("auto", "bf16", "fp16", "fp32"), help=help)


def device_option(help: str = "auto, cpu, cuda or mps"):
    return option("auto", help=help)


def data_option():
    return option(None, help="data source (default: bundled); see README")


def limit_option():
    return option(None, help="N items per language, balanced, parallel")


def batch_tokens_option():
    return option(None, help="rows x padded length per forward")


def max_length_option():
    return option(None, help="cap on prompt tokens (default: model context)")


def trust_file_labels_option():
    return option(False, help="paper-release data: take each file's own gold words instead of the parallel "
                              "English ones")


def progress_option():
    return option(True, help="hide the progress bars")
