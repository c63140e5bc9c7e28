"""The `localmix chat` REPL: streaming replies, slash commands, autosaved conversations."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from localmix.cli.render import os_error_line, prefill_progress, print_stats
from rich.console import Console
from rich.markup import escape

from localmix.conversations import (
    Conversation,
    delete_conversation,
    list_conversations,
)
from localmix.errors import LocalmixError
from localmix.events import ChatEngine, TokenEvent
from localmix.session import SETTINGS, ChatSession, context_note, format_setting
from localmix.store import home

HISTORY_LINES = 1000  # typed lines kept in $LOCALMIX_HOME/history

HELP = f"""commands:
  /help              this list
  /system TEXT       set the system prompt (empty: remove it)
  /set NAME VALUE    a sampling option: {", ".join(SETTINGS[:4])},
                     {", ".join(SETTINGS[4:])} (stop strings separated by |)
  /clear             start over with the same settings (the current chat stays saved)
  /stats             speed and cache figures of the last reply
  /save NAME         save the conversation under NAME (/save NAME --force replaces another)
  /list              saved conversations, newest first
  /load NAME         continue a saved conversation
  /rename NAME       give this conversation another name
  /delete NAME       delete a saved conversation
  /bye               leave (Ctrl+D also leaves)
input between \"\"\" lines spans several lines; Ctrl+C stops a reply and keeps the chat"""


class Repl:
    """The REPL's input and rendering around a `ChatSession`, which owns the conversation."""

    def __init__(self, session: ChatSession, out: Console, err: Console) -> None:
        self.session, self.out, self.err = session, out, err
        session.on_save_problem = self.save_problem
        self.cut_said = False  # the context note, once per conversation

    def save_problem(self, problem: str) -> None:
        self.err.print(f"[yellow]not saved:[/yellow] {problem}", soft_wrap=True)

    def read(self, ask: Callable[[str], str]) -> str:
        line = ask(">>> ")
        if line.strip() != '"""':
            return line
        lines = []
        while (line := ask("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)

    def command(self, line: str) -> bool:
        """Run a slash command; False when the session should end. A LocalmixError leaves the
        session as it was."""
        session = self.session
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("bye", "exit", "quit"):
            return False
        if name == "help":
            self.out.print(HELP, markup=False)
        elif name == "system":
            session.system = arg
            self.out.print("system prompt set" if arg else "system prompt removed")
            session.save()
        elif name == "set":
            key, _, value = arg.partition(" ")
            if key not in SETTINGS or not value.strip():
                self.err.print(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}")
                return True
            stored = session.set(key, value.strip())
            self.out.print(f"{key} = {format_setting(stored)}", markup=False)
            session.save()
        elif name == "clear":
            session.new_chat()
            self.cut_said = False
            self.out.print("new conversation")
        elif name == "stats":
            if session.last is None:
                self.out.print("no finished reply yet")
            else:
                print_stats(session.last, self.err)
        elif name == "save":
            self.save_as(arg)
        elif name == "list":
            self.list()
        elif name == "load":
            session.open(arg)
            self.cut_said = False
            self.show()
        elif name == "rename":
            path = session.rename(arg)
            self.out.print(f"renamed to {arg} ({path})", markup=False)
        elif name == "delete":
            if arg == session.conversation.name:
                raise LocalmixError("that is this conversation; /clear first, then delete it")
            path = delete_conversation(arg)
            self.out.print(f"deleted {arg} ({path})", markup=False)
        else:
            self.err.print(f"unknown command /{name}; /help lists them", markup=False)
        return True

    def save_as(self, arg: str) -> None:
        """/save NAME [--force]: never replaces another conversation unless told to."""
        words = arg.split()
        names = [w for w in words if w != "--force"]
        if len(names) != 1:
            self.err.print("usage: /save NAME  (or /save NAME --force to replace another)")
            return
        path = self.session.save_as(names[0], force="--force" in words)
        self.out.print(f"saved as {names[0]} ({path})", markup=False)

    def list(self) -> None:
        conversations, problems = list_conversations()
        for problem in problems:
            self.err.print(f"[yellow]{escape(problem)}[/yellow]")
        if not conversations:
            self.out.print("no saved conversations")
        for line in conversation_lines(conversations, self.session.conversation.name):
            self.out.print(line, markup=False)

    def show(self) -> None:
        """The loaded conversation, as it was written."""
        print_conversation(self.session.conversation, self.out, self.err)

    def reply(self, text: str) -> None:
        """Stream the reply to `text`. Ctrl+C stops it and keeps what was written (the session
        does), even when a second Ctrl+C comes while it stops."""
        progress = prefill_progress(self.err) if self.err.is_terminal else None
        events = self.session.send(text, progress=progress)
        try:
            for event in events:
                if isinstance(event, TokenEvent):
                    self.out.file.write(event.text)
                    self.out.file.flush()
        except KeyboardInterrupt:
            self.out.file.write("\n")
            self.err.print("[dim](reply stopped)[/dim]")
            return
        finally:
            events.close()
        self.out.file.write("\n")
        note = context_note(self.session.last) if self.session.last else None
        if note and not self.cut_said:
            self.cut_said = True
            self.err.print(f"[yellow]note:[/yellow] {note}")


def print_conversation(conv: Conversation, out: Console, err: Console) -> None:
    """A saved conversation as the chat showed it: typed lines after >>>, replies as written."""
    err.print(f"[dim]{escape(conv.name)}: {len(conv.messages)} messages, {conv.model}[/dim]")
    if conv.system:
        err.print(f"[dim]system: {escape(conv.system)}[/dim]")
    for m in conv.messages:
        text = f">>> {m['content']}" if m["role"] == "user" else m["content"]
        out.print(text, markup=False, highlight=False)


def conversation_lines(conversations: list[Conversation], current: str = "") -> list[str]:
    """One line per saved conversation: name, date, messages, first words."""
    lines = []
    for conv in conversations:
        mark = "*" if conv.name == current else " "
        when = conv.updated[:16].replace("T", " ")
        lines.append(
            f"{mark} {conv.name:<28} {when:<16} {len(conv.messages):>3} messages  {conv.title[:40]}"
        )
    return lines


def line_editing(history: Path) -> Callable[[], None]:
    """Arrow keys, Ctrl+R and a history of typed lines kept across sessions (Python's
    readline, where the platform has it, behind `input`); returns what saves the history."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input
        return lambda: None
    readline.set_history_length(HISTORY_LINES)
    with contextlib.suppress(OSError):
        readline.read_history_file(history)

    def save() -> None:
        with contextlib.suppress(OSError):  # an unwritable home costs the history, not the chat
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)

    return save


def _terminal(stream: object) -> bool:
    """Whether `stream` is a real terminal (readline only edits those)."""
    try:
        return os.isatty(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def repl(
    engine: ChatEngine,
    out: Console,
    err: Console,
    settings: dict,
    system: str | None,
    load: str | None,
    ask: Callable[[str], str] = input,
) -> ChatSession:
    """Read, reply, repeat until /bye or Ctrl+D; returns the session.

    The session's error barrier: an error a user can cause (a bad name or file, a setting out
    of range, a disk that refuses the save) is said in one line and the session goes on with
    nothing typed lost; a bug in localmix still shows its traceback.
    """
    session = ChatSession(engine)
    repl = Repl(session, out, err)
    editing = ask is input and _terminal(sys.stdin)
    save_history = line_editing(home() / "history") if editing else (lambda: None)
    if load:
        session.open(load)
        repl.show()
    session.update(settings)  # the command line's options win over a loaded chat's
    if system is not None:
        session.system = system
    err.print("[dim]/help for commands, Ctrl+D or /bye to leave[/dim]")
    while True:
        try:
            line = repl.read(ask)
        except EOFError:
            out.file.write("\n")
            break
        except KeyboardInterrupt:
            out.file.write("\n")
            err.print("[dim]Ctrl+D or /bye to leave[/dim]")
            continue
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not repl.command(line.strip()):
                    break
            else:
                repl.reply(line)
        except KeyboardInterrupt:
            out.file.write("\n")
            err.print("[dim](stopped)[/dim]")
        except LocalmixError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        except OSError as e:
            err.print(f"[red]error:[/red] {escape(os_error_line(e))}", soft_wrap=True)
    save_history()
    if session.messages:
        session.save()
        if session.save_problem is None:
            err.print(f"[dim]conversation saved as {session.conversation.name}[/dim]")
    sys.stdout.flush()
    return session
