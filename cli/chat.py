"""The `localmix chat` REPL: streaming replies, slash commands, autosaved conversations."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from localmix.cli.render import os_error_line, prefill_progress, print_stats
from rich.console import Console

from localmix.conversations import Conversation, check_name, conversation_path, new_name
from localmix.engine import Engine
from localmix.errors import LocalmixError
from localmix.sampling import SETTABLE, SamplingOptions
from localmix.store import home

HISTORY_LINES = 1000  # typed lines kept in $LOCALMIX_HOME/history

HELP = f"""commands:
  /help              this list
  /system TEXT       set the system prompt (empty: remove it)
  /set NAME VALUE    a sampling option: {", ".join(SETTABLE[:4])},
                     {", ".join(SETTABLE[4:])}
  /clear             start over (the current chat stays saved)
  /stats             speed and cache figures of the last reply
  /save NAME         save the conversation under NAME (/save NAME --force replaces another)
  /load NAME         continue a saved conversation
  /bye               leave (Ctrl+D also leaves)
input between \"\"\" lines spans several lines; Ctrl+C stops a reply and keeps the chat"""


class ChatSession:
    """State of one REPL: the engine, the conversation, the last reply's summary."""

    def __init__(self, engine: Engine, out: Console, err: Console, settings: dict) -> None:
        self.engine, self.out, self.err = engine, out, err
        self.conv = Conversation(name=new_name(), model=engine.name, settings=settings)
        self.last = None
        self.save_problem: str | None = None  # the last autosave's error, said once

    def read(self, ask: Callable[[str], str]) -> str:
        line = ask(">>> ")
        if line.strip() != '"""':
            return line
        lines = []
        while (line := ask("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)

    def autosave(self) -> None:
        """Save as the chat goes; a failure is said once (until saving works again), and the
        chat goes on with everything still in memory."""
        try:
            self.conv.save()
        except LocalmixError as e:
            if str(e) != self.save_problem:
                self.err.print(f"[yellow]not saved:[/yellow] {e}", soft_wrap=True)
            self.save_problem = str(e)
        else:
            if self.save_problem is not None:
                self.err.print(f"[dim]saved again as {self.conv.name}[/dim]")
            self.save_problem = None

    def command(self, line: str) -> bool:
        """Run a slash command; False when the session should end. A LocalmixError leaves the
        session as it was."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("bye", "exit", "quit"):
            return False
        if name == "help":
            self.out.print(HELP)
        elif name == "system":
            self.conv.system = arg
            self.out.print("system prompt set" if arg else "system prompt removed")
            self.autosave()
        elif name == "set":
            key, _, value = arg.partition(" ")
            if key not in SETTABLE or not value.strip():
                self.err.print(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}")
                return True
            self.conv.settings[key] = SamplingOptions.parse(key, value.strip())
            self.out.print(f"{key} = {self.conv.settings[key]}")
            self.autosave()
        elif name == "clear":
            self.conv = Conversation(
                name=new_name(),
                model=self.engine.name,
                system=self.conv.system,
                settings=self.conv.settings,
            )
            self.engine.reset()
            self.out.print("new conversation")
        elif name == "stats":
            if self.last is None:
                self.out.print("no reply yet")
            else:
                print_stats(self.last, self.err)
        elif name == "save":
            self.save_as(arg)
        elif name == "load":
            self.conv = Conversation.load(arg)  # checked whole: a bad file is refused here
            self.out.print(f"loaded {arg}: {len(self.conv.messages)} messages")
        else:
            self.err.print(f"unknown command /{name}; /help lists them")
        return True

    def save_as(self, arg: str) -> None:
        """/save NAME [--force]: never replaces another conversation unless told to."""
        words = arg.split()
        force = "--force" in words
        names = [w for w in words if w != "--force"]
        if len(names) != 1:
            self.err.print("usage: /save NAME  (or /save NAME --force to replace another)")
            return
        name = names[0]
        check_name(name)
        if name != self.conv.name and conversation_path(name).exists() and not force:
            raise LocalmixError(
                f"a conversation named '{name}' is already saved; `/save {name} --force` "
                "replaces it"
            )
        previous = self.conv.name
        self.conv.name = name
        try:
            path = self.conv.save()
        except LocalmixError:
            self.conv.name = previous
            raise
        self.save_problem = None
        self.out.print(f"saved as {name} ({path})")

    def reply(self, text: str) -> None:
        """Send a user message and stream the reply. Ctrl+C stops the reply and keeps what was
        written, even when a second Ctrl+C comes while it stops."""
        self.conv.messages.append({"role": "user", "content": text})
        self.autosave()
        pieces: list[str] = []
        try:
            self.stream(pieces)
        except KeyboardInterrupt:
            self.err.print("[dim](reply stopped)[/dim]")
        finally:
            self.conv.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.autosave()

    def stream(self, pieces: list[str]) -> None:
        """Write the reply as it comes, collecting its text in `pieces`."""
        progress = prefill_progress(self.err) if self.err.is_terminal else None
        events = self.engine.chat(self.conv.for_engine(), progress=progress, **self.conv.settings)
        try:
            for event in events:
                if hasattr(event, "token_id"):
                    pieces.append(event.text)
                    self.out.file.write(event.text)
                    self.out.file.flush()
                else:
                    self.last = event
        finally:
            events.close()
            self.out.file.write("\n")


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
    engine: Engine,
    out: Console,
    err: Console,
    settings: dict,
    system: str | None,
    load: str | None,
    ask: Callable[[str], str] = input,
) -> None:
    """Read, reply, repeat until /bye or Ctrl+D.

    The session's error barrier: an error a user can cause (a bad name or file, a setting out
    of range, a disk that refuses the save) is said in one line and the session goes on with
    nothing typed lost; a bug in localmix still shows its traceback.
    """
    session = ChatSession(engine, out, err, settings)
    editing = ask is input and _terminal(sys.stdin)
    save_history = line_editing(home() / "history") if editing else (lambda: None)
    if load:
        session.conv = Conversation.load(load)
        session.conv.settings.update(settings)  # the command line's options win
    if system is not None:
        session.conv.system = system
    err.print("[dim]/help for commands, Ctrl+D or /bye to leave[/dim]")
    while True:
        try:
            line = session.read(ask)
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
                if not session.command(line.strip()):
                    break
            else:
                session.reply(line)
        except KeyboardInterrupt:
            out.file.write("\n")
            err.print("[dim](stopped)[/dim]")
        except LocalmixError as e:
            err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        except OSError as e:
            err.print(f"[red]error:[/red] {os_error_line(e)}", soft_wrap=True)
    save_history()
    if session.conv.messages:
        session.autosave()
        if session.save_problem is None:
            err.print(f"[dim]conversation saved as {session.conv.name}[/dim]")
    sys.stdout.flush()
