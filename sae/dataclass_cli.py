"""Turn a config dataclass into a command line: each field becomes a `--flag`, its docstring the help.

Fields are documented the way `simple_parsing` (used by EleutherAI's sparsify) reads them: a string
literal right below the field. Supported field types: bool, int, float, str, Path, their
`X | None` forms, and `list[int]` / `list[str]` / `list[float]`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Map each field name of a dataclass (and its bases) to the string literal below it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
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


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _none_or(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null", "") else conv(s)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _parse_bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--field-name` option per dataclass field, defaulting to the field's default."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        flag = "--" + f.name.replace("_", "-")
        # %(default)s (not the value itself): ArgumentDefaultsHelpFormatter then adds no second copy.
        help_text = docs.get(f.name, "").replace("%", "%%")
        help_text = f"{help_text} (default: %(default)s)" if help_text else "(default: %(default)s)"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            kwargs["required"] = True
        origin = typing.get_origin(tp)
        if origin is list:
            (inner,) = typing.get_args(tp)
            kwargs.update(nargs="+", type=inner, metavar=inner.__name__.upper())
        elif tp is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(tp) is typing.Literal:
            kwargs.update(choices=list(typing.get_args(tp)))
        else:
            conv = Path if tp is Path else tp
            kwargs.update(type=_none_or(conv) if optional else conv, metavar=tp.__name__.upper())
        parser.add_argument(flag, **kwargs)


def parse_dataclass(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Parse `argv` into an instance of the dataclass `cls` (fields -> flags, docstrings -> help)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_dataclass_arguments(parser, cls)
    ns = parser.parse_args(argv)
    return cls(**vars(ns))
