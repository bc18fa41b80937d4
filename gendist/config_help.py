"""`gendist config`: every config key with its type, default and meaning, or what a preset changes.

Generated from the dataclasses of gendist.config and their source, so it never goes stale: a key's
meaning is its trailing `# ...` comment, else the comment lines right above it; a section's
docstring is its header line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

import gendist
from gendist.config import ConfigError, RunConfig, differences, load_config, to_dict

PRESETS_DIR = Path(gendist.__file__).parents[1] / "configs"
LISTING_HEADERS = ("KEY", "TYPE", "DEFAULT", "MEANING")


class KeyHelp(NamedTuple):
    key: str  # dotted, as an override names it: section.key
    type: str
    default: Any
    meaning: str


class SectionHelp(NamedTuple):
    name: str
    summary: str  # the section dataclass's docstring on one line; "" without one
    keys: list[KeyHelp]


class Table(NamedTuple):
    title: str
    rows: list[tuple[str, ...]]


def describe_type(annotation: Any) -> str:
    """A type as a reader writes it: `int`, `list[str]`, `tuple[float, float]`, `one of no|bf16|fp16`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(describe_type(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _comment_text(comment: str) -> str:
    return comment.removeprefix("#").strip()


def source_meanings(cls: type) -> tuple[str, dict[str, str]]:
    """The docstring (one line) of the dataclass `cls` and each field's meaning from its comments."""
    source = textwrap.dedent(inspect.getsource(cls))
    own_line: dict[int, str] = {}  # row -> text of a comment alone on its line
    trailing: dict[int, str] = {}  # row -> text of a comment after code
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            (own_line if token.line.lstrip().startswith("#") else trailing)[row] = _comment_text(token.string)
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    meanings: dict[str, str] = {}
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        end = statement.end_lineno or statement.lineno
        after = [trailing[row] for row in range(statement.lineno, end + 1) if row in trailing]
        above: list[str] = []
        row = statement.lineno - 1
        while row in own_line:
            above.insert(0, own_line[row])
            row -= 1
        meanings[statement.target.id] = " ".join(after or above)
    return " ".join((ast.get_docstring(node) or "").split()), meanings


def section_help(name: str, cls: type) -> SectionHelp:
    summary, meanings = source_meanings(cls)
    hints = typing.get_type_hints(cls)
    defaults = to_dict(cls())
    keys = [
        KeyHelp(f"{name}.{f.name}", describe_type(hints[f.name]), defaults[f.name], meanings.get(f.name, ""))
        for f in dataclasses.fields(cls)
    ]
    return SectionHelp(name, summary, keys)


def run_config_help() -> list[SectionHelp]:
    """One SectionHelp per section of RunConfig, in its order."""
    hints = typing.get_type_hints(RunConfig)
    return [section_help(f.name, hints[f.name]) for f in dataclasses.fields(RunConfig)]


def format_value(value: Any) -> str:
    """A value as YAML and the overrides read it: "text", 0.0002, true, [0.5, 0.999]."""
    return json.dumps(value)


def presets() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PRESETS_DIR.glob("*.yaml"))}


def resolve(name: str) -> list[tuple[str, Path]]:
    """(label, YAML path) for a YAML file, a preset of configs/, or every preset of a family (model.name)."""
    known = presets()
    if name in known:
        return [(f"{name} (configs/{known[name].name})", known[name])]
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return [(name, path)]
    of_family = [
        (f"{stem} (configs/{path.name})", path) for stem, path in known.items() if load_config(path).model.name == name
    ]
    if not of_family:
        raise ConfigError(
            f"no preset or family named {name!r}; presets in {PRESETS_DIR}: {', '.join(known)} "
            f"(or give a model.name family, or a path to a YAML file)"
        )
    return of_family


def listing_tables(sections: list[SectionHelp]) -> list[Table]:
    return [
        Table(
            f"{section.name}: {section.summary}" if section.summary else section.name,
            [(key.key, key.type, format_value(key.default), key.meaning) for key in section.keys],
        )
        for section in sections
    ]


def preset_tables(targets: list[tuple[str, Path]], section: str | None) -> list[Table]:
    meanings = {key.key: key.meaning for s in run_config_help() for key in s.keys}
    defaults = to_dict(RunConfig())
    tables = []
    for label, path in targets:
        changed = differences(defaults, to_dict(load_config(path)))
        rows = [
            (key, format_value(old), format_value(new), meanings[key])
            for key, (old, new) in changed.items()
            if section is None or key.startswith(f"{section}.")
        ]
        tables.append(Table(f"{label}: changes {len(rows)} of the defaults", rows))
    return tables


def render_plain(headers: tuple[str, ...], tables: list[Table]) -> str:
    """Columns aligned over all tables; the last (the meaning) is left unpadded."""
    widths = [max(len(row[i]) for row in [headers, *(r for t in tables for r in t.rows)]) for i in range(len(headers))]

    def line(cells: tuple[str, ...]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells[:-1], widths)]
        return "  " + "  ".join([*padded, cells[-1]]).rstrip()

    lines = [line(headers)]
    for table in tables:
        lines += ["", table.title, *(line(row) for row in table.rows)]
    return "\n".join(lines) + "\n"


def print_tables(headers: tuple[str, ...], tables: list[Table]) -> None:
    """Rich tables on a terminal; plain aligned text otherwise, one key per line, for pipes and grep."""
    if not sys.stdout.isatty():
        sys.stdout.write(render_plain(headers, tables))
        return
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    console = Console()
    for table in tables:  # Text: a cell such as "[-c, c]" is not rich markup
        shown = RichTable(*headers, title=Text(table.title), title_justify="left")
        for row in table.rows:
            shown.add_row(*map(Text, row))
        console.print(shown)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "preset",
        nargs="?",
        metavar="PRESET_OR_FAMILY",
        help="show what it changes from the defaults: a preset of configs/ (e.g. srgan_16to64_celeba), a YAML "
        "file, or a family (model.name: every preset of it)",
    )
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    parser.add_argument("--section", choices=sections, help="only the keys of this section")


def run(args: argparse.Namespace) -> int:
    """Raises ConfigError for an unknown preset or a wrong YAML file (the CLI says it, exit 2)."""
    if args.preset is None:
        sections = [s for s in run_config_help() if args.section in (None, s.name)]
        print_tables(LISTING_HEADERS, listing_tables(sections))
    else:
        print_tables(("KEY", "DEFAULT", "PRESET", "MEANING"), preset_tables(resolve(args.preset), args.section))
    return 0


class HelpConfigAction(argparse.Action):
    """`--help-config`: like --help, print every config key (what `gendist config` prints) and exit."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print_tables(LISTING_HEADERS, listing_tables(run_config_help()))
        parser.exit()
