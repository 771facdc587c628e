"""One configuration schema: every setting is a dataclass field carrying its rule, help and flag. A config checks
itself when built (``check`` in ``__post_init__``), so a value from the command line, a YAML file or Python is refused
the same way, before any model loads; the flags are derived from the fields (``add_flags``, ``from_args``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, field, fields
from typing import Any

Rule = Callable[[Any], "str | None"]  # what is wrong with a value, or None


def setting(default: Any = MISSING, *, help: str = "", rule: Rule | None = None, choices: Sequence | None = None,
            flag: str | None = None, cli: bool = True, parse: Callable[[str], Any] | None = None,
            default_factory: Any = MISSING) -> Any:
    """A dataclass field with its ``rule`` (or ``choices``), help text and command-line ``flag`` (default
    ``--field-name``; ``--no-...`` switches a setting off); ``parse`` turns the flag's text into a value."""
    return field(default=default, default_factory=default_factory, metadata=dict(
        help=help, rule=rule, choices=tuple(choices) if choices else None, flag=flag, cli=cli, parse=parse))


def check(config: Any) -> None:
    """Each field of ``config`` against its rule; the first wrong one is a ValueError naming the field."""
    for f in fields(config):
        if problem := field_problem(f, getattr(config, f.name)):
            raise ValueError(f"{f.name}: {problem}")


def field_problem(f: Field, value: Any) -> str | None:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        return f"expected one of {', '.join(map(str, choices))}; got {value!r}"
    rule = f.metadata.get("rule")
    return rule(value) if rule else None


def integer(low: int | None = None, *, optional: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {value!r}"
        if low is not None and value < low:
            return f"expected a positive integer, got {value}" if low == 1 else f"expected at least {low}, got {value}"
        return None
    return rule


def number(low: float | None = None, high: float | None = None, *, above: bool = False, below: bool = False,
           optional: bool = False) -> Rule:
    """A finite number in [low, high] (``above``/``below``: the bound itself excluded)."""
    def rule(value: Any) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        if low is not None and (value <= low if above else value < low):
            return f"expected a number {'>' if above else '≥'} {low:g}, got {value:g}"
        if high is not None and (value >= high if below else value > high):
            return f"expected a number {'<' if below else '≤'} {high:g}, got {value:g}"
        return None
    return rule


def text(*, optional: bool = False) -> Rule:
    return lambda value: (None if (isinstance(value, str) and value.strip()) or (value is None and optional)
                          else f"expected a non-empty string, got {value!r}")


def boolean(*, optional: bool = False) -> Rule:
    return lambda value: (None if isinstance(value, bool) or (value is None and optional)
                          else f"expected true or false, got {value!r}")


def each(item: Rule, *, nonempty: bool = True) -> Rule:
    """A list whose every item follows ``item``."""
    def rule(value: Any) -> str | None:
        if not isinstance(value, list) or (nonempty and not value):
            return f"expected a {'non-empty ' if nonempty else ''}list, got {value!r}"
        return next((f"item {i}: {problem}" for i, element in enumerate(value) if (problem := item(element))), None)
    return rule


def mapping(key: Rule, value_rule: Rule | None = None, *, nonempty: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if not isinstance(value, Mapping) or (nonempty and not value):
            return f"expected a {'non-empty ' if nonempty else ''}mapping, got {value!r}"
        problems = ((k, key(k) or (value_rule(v) if value_rule else None)) for k, v in value.items())
        return next((f"{k!r}: {problem}" for k, problem in problems if problem), None)
    return rule


def add_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
              only: Sequence[str] | None = None) -> None:
    """A flag for each field of ``cls`` marked ``cli`` (or each of ``only``); ``dest`` is ``prefix + name``."""
    for f in fields(cls):
        if not f.metadata.get("cli") or (only is not None and f.name not in only):
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        common = {"dest": prefix + f.name, "default": default, "help": f.metadata["help"] or None}
        if flag.startswith("--no-"):
            parser.add_argument(flag, action="store_const", const=False, **common)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", **common)
        else:
            parser.add_argument(flag, type=_flag_type(f, default), choices=f.metadata["choices"],
                                metavar=None if f.metadata["choices"] else f.name.upper(), **common)


def _flag_type(f: Field, default: Any) -> Callable[[str], Any]:
    parse = f.metadata["parse"] or type(default)

    def convert(raw: str) -> Any:
        try:
            value = parse(raw)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(parse, getattr(parse, "kind", "a value"))
            raise argparse.ArgumentTypeError(f"expected {kind}, got {raw!r}") from None
        if not f.metadata["choices"] and (problem := field_problem(f, value)):
            raise argparse.ArgumentTypeError(problem)
        return value

    return convert


def from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **fixed: Any) -> Any:
    """The configuration the flags of ``add_flags`` describe (fields without a flag keep their defaults)."""
    given = {f.name: getattr(args, prefix + f.name) for f in fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**(given | fixed))
