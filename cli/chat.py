"""The `localmix chat` REPL: streaming replies, slash commands, autosaved conversations."""

from __future__ import annotations

import sys
from collections.abc import Callable

from localmix.cli.render import print_stats
from rich.console import Console

from localmix.conversations import Conversation, new_name
from localmix.engine import Engine
from localmix.sampling import SamplingOptions

HELP = """commands:
  /help              this list
  /system TEXT       set the system prompt (empty: remove it)
  /set NAME VALUE    a sampling option: temperature, top_p, top_k, min_p,
                     repetition_penalty, seed, max_tokens
  /clear             start over (the current chat stays saved)
  /stats             speed and cache figures of the last reply
  /save NAME         save the conversation under NAME
  /load NAME         continue a saved conversation
  /bye               leave (Ctrl+D also leaves)
input between \"\"\" lines spans several lines; Ctrl+C stops a reply and keeps the chat"""

SETTABLE = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "seed": int,
    "max_tokens": int,
}


class ChatSession:
    """State of one REPL: the engine, the conversation, the last reply's summary."""

    def __init__(self, engine: Engine, out: Console, err: Console, settings: dict) -> None:
        self.engine, self.out, self.err = engine, out, err
        self.conv = Conversation(name=new_name(), model=engine.name, settings=settings)
        self.last = None

    def read(self, ask: Callable[[str], str]) -> str:
        line = ask(">>> ")
        if line.strip() != '"""':
            return line
        lines = []
        while (line := ask("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)

    def command(self, line: str) -> bool:
        """Run a slash command; False when the session should end."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("bye", "exit", "quit"):
            return False
        if name == "help":
            self.out.print(HELP)
        elif name == "system":
            self.conv.system = arg
            self.out.print("system prompt set" if arg else "system prompt removed")
            self.conv.save()
        elif name == "set":
            key, _, value = arg.partition(" ")
            if key not in SETTABLE or not value:
                self.err.print(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}")
                return True
            try:
                SamplingOptions().updated(**{key: SETTABLE[key](value)})
                self.conv.settings[key] = SETTABLE[key](value)
            except ValueError as e:
                self.err.print(f"cannot set {key}: {e}")
                return True
            self.out.print(f"{key} = {self.conv.settings[key]}")
            self.conv.save()
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
            if not arg:
                self.err.print("usage: /save NAME")
                return True
            self.conv.name = arg
            self.out.print(f"saved as {arg} ({self.conv.save()})")
        elif name == "load":
            self.conv = Conversation.load(arg)
            self.out.print(f"loaded {arg}: {len(self.conv.messages)} messages")
        else:
            self.err.print(f"unknown command /{name}; /help lists them")
        return True

    def reply(self, text: str) -> None:
        """Send a user message and stream the reply; Ctrl+C keeps what was written."""
        self.conv.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        events = None
        try:
            self.conv.save()
            events = self.engine.chat(self.conv.for_engine(), **self.conv.settings)
            for event in events:
                if hasattr(event, "token_id"):
                    pieces.append(event.text)
                    self.out.file.write(event.text)
                    self.out.file.flush()
                else:
                    self.last = event
        except KeyboardInterrupt:
            if events is not None:
                events.close()
            self.out.file.write("\n")
            self.err.print("[dim](reply stopped)[/dim]")
        self.out.file.write("\n")
        self.conv.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.conv.save()


def repl(
    engine: Engine,
    out: Console,
    err: Console,
    settings: dict,
    system: str | None,
    load: str | None,
    ask: Callable[[str], str] = input,
) -> None:
    """Read, reply, repeat until /bye or Ctrl+D."""
    session = ChatSession(engine, out, err, settings)
    if load:
        session.conv = Conversation.load(load)
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
        if line.startswith("/"):
            try:
                if not session.command(line.strip()):
                    break
            except Exception as e:  # a bad /load name etc. must not end the session
                err.print(f"[red]error:[/red] {e}")
            continue
        session.reply(line)
    err.print(f"[dim]conversation saved as {session.conv.name}[/dim]")
    sys.stdout.flush()
