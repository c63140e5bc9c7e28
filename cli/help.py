"""`localmix --help`: the top-level help drawn with rich's console, table and panel alone.

Typer's own renderer (typer.rich_utils) imports rich's Markdown, markdown-it and Pygments to
draw help, which is most of the time `localmix --help` takes. `HelpGroup` draws the same
panels (usage, description, options, commands) with only what the console already loads; the
help of each command keeps typer's renderer.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING

from rich.console import Console
from rich.highlighter import RegexHighlighter
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.theme import Theme
from typer.core import TyperGroup

if TYPE_CHECKING:
    from typer import _click  # the click that typer carries, whose types its classes take

# typer.rich_utils' styles, so that the top-level help looks like each command's
THEME = Theme(
    {
        "option": "bold cyan",
        "switch": "bold green",
        "types": "bold yellow",
        "usage": "yellow",
        "command": "bold cyan",
        "required": "red",
    }
)
PANEL_BORDER = "dim"


class OptionHighlighter(RegexHighlighter):
    """Options, switches and `<types>` in help text, styled as typer styles them."""

    highlights = [
        r"(^|\W)(?P<switch>\-\w+)(?![a-zA-Z0-9])",
        r"(^|\W)(?P<option>\-\-[\w\-]+)(?![a-zA-Z0-9])",
        r"(?P<types>\<[^\>]+\>)",
        r"(?P<usage>Usage: )",
    ]


highlight = OptionHighlighter()


class HelpGroup(TyperGroup):
    """The `localmix` group: its help is drawn here, without typer.rich_utils."""

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        console = help_console()
        console.print(Padding(highlight(self.get_usage(ctx)), 1), style="bold")
        if self.help:
            console.print(Padding(description(self.help), (0, 1, 1, 1)))
        options = [p for p in self.get_params(ctx) if not getattr(p, "hidden", False)]
        if options:
            console.print(panel("Options", options_table(options, ctx)))
        commands = [self.get_command(ctx, name) for name in self.list_commands(ctx)]
        shown = [c for c in commands if c is not None and not c.hidden]
        if shown:
            console.print(panel("Commands", commands_table(shown)))


def help_console() -> Console:
    """A stdout console as typer's renderer makes it ($TERMINAL_WIDTH sets the width)."""
    width = os.environ.get("TERMINAL_WIDTH")
    forced = any(os.environ.get(v) for v in ("GITHUB_ACTIONS", "FORCE_COLOR", "PY_COLORS"))
    return Console(
        theme=THEME,
        highlighter=highlight,
        emoji=False,
        force_terminal=True if forced else None,
        width=int(width) if width else None,
    )


def first_paragraph(help_text: str) -> str:
    """A command's help up to its first blank line, on one line."""
    return inspect.cleandoc(help_text).partition("\f")[0].split("\n\n")[0].replace("\n", " ")


def description(help_text: str) -> Text:
    """The group's own help: its first paragraph, then the rest dimmed."""
    first, _, rest = inspect.cleandoc(help_text).partition("\n\n")
    text = highlight(markup(first))
    if rest:
        text.append("\n\n")
        text.append(markup(rest, style="dim"))
    return text


def markup(help_text: str, style: str = "") -> Text:
    """Help text as typer reads it (rich markup, its lines joined), without emoji codes."""
    return Text.from_markup(" ".join(help_text.split()), style=style, emoji=False)


def panel(title: str, table: Table) -> Panel:
    """A titled box around a table, as typer draws its panels."""
    return Panel(table, border_style=PANEL_BORDER, title=Text(title), title_align="left")


def options_table(params: list[_click.Parameter], ctx: _click.Context) -> Table:
    """Rows of long names, short names, type and help."""
    table = Table(highlight=True, show_header=False, expand=True, box=None, pad_edge=False)
    for param in params:
        long = ",".join(o for o in param.opts if o.startswith("--"))
        short = ",".join(o for o in param.opts if not o.startswith("--"))
        kind = getattr(param, "display_type_rich", None)
        shown = kind(ctx=ctx) if kind is not None else None
        help_text = markup(getattr(param, "help", None) or "")
        if param.required:
            help_text.append(" [required]", style="required")
        table.add_row(
            Text(long, style="option"),
            Text(short, style="switch"),
            Text(shown or "", style="types"),
            highlight(help_text),
        )
    return table


def commands_table(commands: list[_click.Command]) -> Table:
    """A row per command: its name, and its help's first paragraph."""
    table = Table(highlight=False, show_header=False, expand=True, box=None, pad_edge=False)
    table.add_column(style="command", no_wrap=True, width=max(len(c.name or "") for c in commands))
    table.add_column(justify="left", no_wrap=False, ratio=10)
    for command in commands:
        help_text = command.short_help or command.help or ""
        table.add_row(Text(command.name or ""), markup(first_paragraph(help_text)))
    return table
