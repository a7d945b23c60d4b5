"""The one command-line parser of every ``tetrad`` subcommand: the standard library's argparse,
with an option per config field typed from its annotation (lists and dicts included), help from
the field's docstring, and errors raised as one-line ConfigErrors that name the closest option.

The same typed conversion (``coerce``) reads values from TOML files, so a value means the same
thing in either place.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import itertools
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from tetrad.config.job_config import Config
from tetrad.errors import ConfigError

CONFIG_USAGE = "[--config FILE.toml] [--section.field=VALUE ...]"

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@functools.cache
def sections() -> dict[str, type]:
    """The config's sections (the option prefixes), by name."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


@functools.cache
def field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


@functools.cache
def _module_classes(module: str) -> dict[str, ast.ClassDef]:
    """A module's top-level classes, by name, from its source parsed once: ``inspect.getsource``
    of each class parses the whole module again (0.1 s of every process's start-up, measured
    with the 18 config sections)."""
    tree = ast.parse(inspect.getsource(sys.modules[module]))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right under a field) of a top-level dataclass, by
    field."""
    body = _module_classes(cls.__module__)[cls.__name__].body
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def unknown_key(
    key: str, known: Iterable[str], *, prefix: str, prog: str = "tetrad train"
) -> ConfigError:
    """``unknown config key --x.y; did you mean --x.z?`` (prefix "--" on the command line)."""
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{match[0]}?" if match else f"; see `{prog} --help`"
    return ConfigError(f"unknown config key {prefix}{key}{hint}")


def _split(text: str) -> list[str]:
    """Comma-separated items, split outside brackets, braces and quotes (JSON values stay
    whole); blank items dropped."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [item.strip() for item in [*items, text[start:]] if item.strip()]


def _key_values(text: str) -> dict[str, Any]:
    """``a=1,b=gelu,c=[1,2]`` → {"a": 1, "b": "gelu", "c": [1, 2]}: JSON values, else strings."""
    values: dict[str, Any] = {}
    for item in _split(text):
        key, eq, raw = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ValueError(f"{item!r} is not key=value")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
        if values[key] is None:  # the run folder's config.toml could not hold it
            raise ValueError(f"{item!r}: TOML has no null, so a value cannot be unset")
    return values


def coerce(raw: Any, annotation: Any) -> Any:
    """A TOML or command-line value as the field's type, or a ValueError saying why not."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = raw is None or (isinstance(raw, str) and raw.lower() in {"none", "null"})
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(raw, arg)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if raw in args:
            return raw
        raise ValueError(f"{raw!r} is not one of: {', '.join(str(a) for a in args)}")
    if origin is list:
        items = _split(raw) if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise ValueError(f"expected a list, got {raw!r}")
        return [coerce(item, args[0]) for item in items]
    if origin is dict:
        table = _key_values(raw) if isinstance(raw, str) else raw
        if not isinstance(table, dict):
            raise ValueError(f"expected a table of key=value, got {raw!r}")
        return {str(k): coerce(v, args[1]) for k, v in table.items()}
    if annotation is Any:
        return raw
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"expected true or false, got {raw!r}")
    if annotation in (int, float):
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            if annotation is float or isinstance(raw, int):
                return annotation(raw)
        elif isinstance(raw, str):
            with contextlib.suppress(ValueError):
                return annotation(raw)
        raise ValueError(
            f"expected {'an integer' if annotation is int else 'a number'}, got {raw!r}"
        )
    if annotation is str:
        if isinstance(raw, str):
            return raw
        raise ValueError(f"expected a string, got {raw!r}")
    raise TypeError(f"config fields of type {annotation!r} are not supported")


def type_name(annotation: Any) -> str:
    """The metavar of a type in --help: INT, {a,b}, STR,..., KEY=VALUE,..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"{type_name(args[0])},..."
    if origin is dict:
        return "KEY=VALUE,..."
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(annotation, str(annotation))


def converter(annotation: Any) -> Callable[[str], Any]:
    """argparse's ``type=`` for a value of this type (``coerce``)."""

    def convert(raw: str) -> Any:
        try:
            return coerce(raw, annotation)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose every error is a one-line ConfigError (the entry points print it and exit
    2); an unknown option names the closest known one; no prefix abbreviations (a typo)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        key, _, problem = message.removeprefix("argument ").partition(": ")
        if problem == "expected one argument":
            raise ConfigError(f"{key} needs a value: {key}=VALUE")
        raise ConfigError(f"{key}: {problem}" if problem else key)

    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        """Also called per subcommand; anything it does not know is an error, with a hint."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and extras[0].startswith("--"):
            options = [o[2:] for o in self._option_string_actions if o.startswith("--")]
            key = extras[0][2:].partition("=")[0]
            raise unknown_key(key, options, prefix="--", prog=self.prog)
        if extras:
            raise ConfigError(
                f"unexpected argument {extras[0]!r}; options look like --section.field=value"
            )
        return namespace, extras


def add_config_arguments(
    parser: argparse.ArgumentParser, only: Sequence[str] | None = None
) -> None:
    """``--config FILE.toml`` and ``--section.field`` for every field of the sections ``only``
    names (all by default). A given value lands in the namespace as "section.field", typed."""
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        default=argparse.SUPPRESS,
        help="TOML file of [section] tables: it overrides the defaults, the command line it",
    )
    defaults = Config()
    for section, cls in sections().items():
        if only is not None and section not in only:
            continue
        group = parser.add_argument_group(f"[{section}]")
        docs = field_docs(cls)
        for name, annotation in field_types(cls).items():
            default = getattr(getattr(defaults, section), name)
            flag = annotation in (bool, bool | None)  # --flag alone means --flag=true
            group.add_argument(
                f"--{section}.{name}",
                type=converter(annotation),
                metavar=type_name(annotation),
                nargs="?" if flag else None,
                const="true" if flag else None,
                default=argparse.SUPPRESS,
                help=f"{docs.get(name, '')} (default: {default})".replace("%", "%%"),
            )
