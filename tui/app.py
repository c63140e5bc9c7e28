"""The Textual chat app: streaming Markdown replies, saved conversations, settings, live stats.

The conversation is a `ChatSession` (localmix.session); the model runs in a worker thread and
the UI only renders the session's events. Keys: Enter sends, Ctrl+J inserts a newline, Esc
stops a reply, Ctrl+N starts a new chat, F2 opens Settings, F3 Stats, Ctrl+Q quits.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import select
import threading
import time
from collections.abc import Callable

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, ScrollableContainer, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import (
    Footer,
    Header,
    Input,
    Label,
    ListItem,
    ListView,
    Markdown,
    Static,
    TabbedContent,
    TabPane,
    TextArea,
)

from localmix.conversations import list_conversations
from localmix.engine import Engine, Summary
from localmix.errors import LocalmixError, OptionError
from localmix.session import ChatSession, context_note, format_setting
from localmix.units import mib

REFRESH_S = 0.05  # at most this often the streaming reply is re-rendered
ACTIVITY_DECAY = 0.9  # per token, for the heatmap's "recently routed"
HEAT = ["grey19", "dark_blue", "blue3", "dodger_blue2", "green3", "yellow1", "dark_orange", "red1"]


def shows_errors(handler: Callable) -> Callable:
    """The app's error barrier, on each handler of what the user does: an error a user can
    cause (a bad file, a full disk, a model's corrupt weights) becomes a notification and the
    app goes on; a bug still ends the app with its traceback."""

    @functools.wraps(handler)
    async def wrapper(self: LocalmixApp, *args, **kwargs):
        try:
            result = handler(self, *args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        except (LocalmixError, OSError) as e:
            self.notify(str(e), severity="error", timeout=10)

    return wrapper


CONTROL = {c: None for c in range(32) if chr(c) not in "\n\t"} | {127: None}


def printable(text: str) -> str:
    """Text without control characters (a model can emit them; terminals misbehave on them)."""
    return text.translate(CONTROL)


def typed_ahead(fd: int = 0) -> str:
    """What was typed on the terminal `fd` and not read yet (while the model loaded), taken
    before the app starts so that it lands in the prompt instead of being lost."""
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        return ""
    try:
        before = termios.tcgetattr(fd)
    except (termios.error, OSError):
        return ""
    raw = list(before)
    raw[3] &= ~(termios.ICANON | termios.ECHO)  # a half-typed line becomes readable
    data = b""
    try:
        termios.tcsetattr(fd, termios.TCSANOW, raw)
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSANOW, before)
    return printable(data.decode("utf-8", "replace")).strip("\n")


class PromptArea(TextArea):
    """The prompt box: Enter sends, Ctrl+J inserts a newline."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
                self.clear()
            return
        if event.key == "ctrl+j":
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class Heatmap(Static):
    """Layers x experts: colour for how often each expert was routed recently, a dot if resident."""

    def show(self, activity: list[list[float]], resident: list[set[int]]) -> None:
        text = Text()
        n = len(activity[0]) if activity else 0
        text.append("layer " + "".join(f"{e:>3}" for e in range(n)) + "\n", style="dim")
        for layer, row in enumerate(activity):
            text.append(f"{layer:>5} ")
            for e, value in enumerate(row):
                colour = HEAT[min(int(value * len(HEAT)), len(HEAT) - 1)]
                mark = "●" if e in resident[layer] else " "
                text.append(f" {mark} ", style=f"on {colour}")
            text.append("\n")
        text.append(
            "● resident on the device; colour: routed recently (blue rare, red often)", style="dim"
        )
        self.update(text)


class ChatMessage(Vertical):
    """One message in the chat log: Markdown for a chat model, the text as it is (line breaks and
    indentation kept) for a base model, whose replies continue code or prose. A base model's
    lines do not wrap: a long line scrolls sideways, so code keeps its indentation."""

    def __init__(self, role: str, content: str, *, markdown: bool = True) -> None:
        super().__init__(classes=f"message {role}")
        self.role, self.content, self.markdown = role, content, markdown
        self.border_title = "you" if role == "user" else "localmix"

    def compose(self) -> ComposeResult:
        if self.markdown:
            yield Markdown(printable(self.content))
        else:
            with ScrollableContainer(classes="lines"):
                yield Static(self.plain(self.content), classes="plain")

    @staticmethod
    def plain(content: str) -> Text:
        return Text(printable(content), no_wrap=True, overflow="ignore")

    async def set_content(self, content: str) -> None:
        self.content = content
        if self.markdown:
            await self.query_one(Markdown).update(printable(content))
        else:
            self.query_one(".plain", Static).update(self.plain(content))


SETTING_FIELDS = (  # (setting, label); the values come from the session
    ("system", "system prompt"),
    ("temperature", "temperature (0 = greedy)"),
    ("top_k", "top-k (0 = off)"),
    ("top_p", "top-p (1 = off)"),
    ("min_p", "min-p (0 = off)"),
    ("repetition_penalty", "repetition penalty (1 = off)"),
    ("seed", "seed (empty = random)"),
    ("max_tokens", "max tokens per reply"),
    ("stop", "stop strings (separated by |)"),
    ("context", "context window (tokens; Enter applies)"),
)


class LocalmixApp(App):
    """Chat with a local model, with the expert machinery in view.

    `settings` (sampling options by name), `system` and `load` (a saved conversation to open)
    are the command line's `chat` options; they show in Settings. `typed` starts the prompt.
    """

    TITLE = "localmix"
    CSS = """
    #sidebar { width: 28; border-right: solid $primary-darken-2; }
    #sidebar ListView { height: 1fr; }
    #main { width: 1fr; }
    #log { height: 1fr; padding: 0 1; }
    #panel { width: 46; border-left: solid $primary-darken-2; }
    .message { height: auto; margin: 0 0 1 0; padding: 0 1; border: round $secondary; }
    .message.user { border: round $accent; }
    .message Markdown { margin: 0; padding: 0; }
    .message .lines { height: auto; overflow-x: auto; overflow-y: hidden; }
    .message .plain { width: auto; }
    PromptArea { height: 5; border: round $accent; }
    #stats-text { height: auto; }
    .setting { height: auto; }
    .setting Label { margin: 0; color: $text-muted; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("f2", "show_tab('settings')", "Settings"),
        Binding("f3", "show_tab('stats')", "Stats"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(
        self,
        engine: Engine,
        *,
        settings: dict | None = None,
        system: str | None = None,
        load: str | None = None,
        typed: str = "",
        blink: bool = True,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.blink = blink
        self.typed = typed  # text typed before the app started: it goes into the prompt
        self.session = ChatSession(engine, on_save_problem=self.save_problem)
        if load:
            self.session.open(load)
        self.session.update(settings or {})  # the command line's options win over a saved chat's
        if system is not None:
            self.session.system = system
        self.stop_flag = threading.Event()
        self.generating = False
        layers = len(engine.model.moe_layers())
        self.activity = [[0.0] * engine.config.num_local_experts for _ in range(layers)]
        self.sub_title = engine.name
        self.said: set[str] = set()  # problems already shown (a save that fails, a bad file)
        self.cut_said = ""  # the conversation whose start the context no longer holds, said

    @property
    def conv(self):
        """The conversation on screen."""
        return self.session.conversation

    @property
    def last(self) -> Summary | None:
        """The figures of the reply on screen (None while none has finished)."""
        return self.session.last

    def say_once(self, problem: str) -> None:
        if problem not in self.said:
            self.said.add(problem)
            self.notify(problem, severity="warning", timeout=10)

    def save_problem(self, problem: str) -> None:
        self.say_once(f"not saved: {problem}")

    # -- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("conversations (Ctrl+N: new)")
                yield ListView(id="conversations")
            with Vertical(id="main"):
                yield VerticalScroll(id="log")
                prompt = PromptArea(id="prompt")
                prompt.cursor_blink = self.blink
                prompt.border_title = "message (Enter: send, Ctrl+J: newline, Esc: stop)"
                yield prompt
            with TabbedContent(id="panel"):
                with TabPane("Stats", id="stats"):
                    yield Static(id="stats-text")
                    yield Heatmap(id="heatmap")
                with TabPane("Settings", id="settings"), VerticalScroll():
                    for key, label in SETTING_FIELDS:
                        with Vertical(classes="setting"):
                            yield Label(label)
                            field = Input(id=f"set-{key}", compact=True)  # filled on mount
                            field.cursor_blink = self.blink
                            yield field
        yield Footer()

    def setting_text(self, key: str) -> str:
        """A setting's current value as its field shows it."""
        if key == "system":
            return self.session.system
        if key == "context":
            return str(self.engine.context)
        value = getattr(self.session.options, key)
        return "" if value is None else format_setting(value)

    @shows_errors
    async def on_mount(self) -> None:
        self.refresh_sidebar()
        self.refresh_stats()
        self.show_settings()
        prompt = self.query_one(PromptArea)
        prompt.focus()
        if self.typed:
            prompt.insert(self.typed)
        if self.conv.messages:  # opened with --load
            await self.show_conversation()

    def on_key(self, event) -> None:
        """A key that reaches the app with nothing focused (typed while the app was starting)
        goes into the prompt instead of being lost."""
        if self.focused is None and event.is_printable and event.character:
            prompt = self.query_one(PromptArea)
            prompt.focus()
            prompt.insert(event.character)
            event.stop()

    def action_show_tab(self, tab: str) -> None:
        self.query_one("#panel", TabbedContent).active = tab
        if tab == "settings":
            self.query_one("#set-system", Input).focus()

    # -- conversations ---------------------------------------------------------------------

    def refresh_sidebar(self) -> None:
        view = self.query_one("#conversations", ListView)
        view.clear()
        conversations, problems = list_conversations()
        for problem in problems:  # one unreadable file does not hide the others
            self.say_once(problem)
        for conv in conversations:
            when = conv.updated[5:16].replace("T", " ")  # MM-DD HH:MM
            label = Text(conv.title[:24])
            label.append(f"\n{when}", style="dim")
            view.append(ListItem(Label(label), name=conv.name))

    @on(ListView.Selected, "#conversations")
    @shows_errors
    async def open_conversation(self, event: ListView.Selected) -> None:
        if self.generating or event.item.name is None:
            return
        self.session.open(event.item.name)
        await self.show_conversation()

    async def show_conversation(self) -> None:
        log = self.query_one("#log", VerticalScroll)
        await log.remove_children()
        await log.mount_all([self.message(m["role"], m["content"]) for m in self.conv.messages])
        log.scroll_end(animate=False)
        self.show_settings()
        self.refresh_stats()

    def show_settings(self) -> None:
        for key, _ in SETTING_FIELDS:
            field = self.query_one(f"#set-{key}", Input)
            with field.prevent(Input.Changed):
                field.value = self.setting_text(key)
            field.remove_class("-invalid")

    @shows_errors
    async def action_new_chat(self) -> None:
        if self.generating:
            self.action_stop()
            return
        self.session.new_chat()
        await self.query_one("#log", VerticalScroll).remove_children()
        self.refresh_stats()
        self.query_one(PromptArea).focus()

    # -- settings --------------------------------------------------------------------------

    @on(Input.Changed)
    @shows_errors
    def setting_changed(self, event: Input.Changed) -> None:
        """A sampling setting applies as it is typed (a wrong value marks the field and keeps
        the last good one); the context applies on Enter or when the field is left."""
        key = (event.input.id or "").removeprefix("set-")
        event.input.remove_class("-invalid")
        if key in ("context", "") or event.value == self.setting_text(key):
            return  # a field filled in (compose, a chat opened): nothing changed
        if key == "system":
            self.session.system = event.value
        elif key == "seed" and not event.value.strip():
            self.session.conversation.settings.pop("seed", None)
        else:
            try:
                self.session.set(key, event.value.strip() if key != "stop" else event.value)
            except OptionError:
                event.input.add_class("-invalid")

    @on(Input.Submitted, "#set-context")
    @on(Input.Blurred, "#set-context")
    @shows_errors
    def context_changed(self, event: Input.Submitted | Input.Blurred) -> None:
        """A new context window, applied once (resizing the KV cache is not a keystroke's work)."""
        field = event.input
        field.remove_class("-invalid")
        try:
            context = int(field.value)
        except ValueError:
            field.add_class("-invalid")
            return
        if context == self.engine.context:
            return
        if self.generating:
            self.notify("the context changes after this reply", severity="warning")
            return
        try:
            self.engine.set_context(context)
        except OptionError:
            field.add_class("-invalid")
            raise
        with field.prevent(Input.Changed):
            field.value = str(self.engine.context)  # at most the model's own window
        self.refresh_stats()

    # -- chatting --------------------------------------------------------------------------

    @on(PromptArea.Submitted)
    @shows_errors
    async def send(self, event: PromptArea.Submitted) -> None:
        if self.generating:
            self.bell()
            return
        log = self.query_one("#log", VerticalScroll)
        reply = self.message("assistant", "…")
        await log.mount_all([self.message("user", event.text), reply])
        log.scroll_end(animate=False)
        self.generating = True
        self.stop_flag.clear()
        self.generate(event.text, reply)

    def message(self, role: str, content: str) -> ChatMessage:
        return ChatMessage(role, content, markdown=self.engine.template.chat_format)

    def action_stop(self) -> None:
        if self.generating:
            self.stop_flag.set()

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, text: str, reply: ChatMessage) -> None:
        """Run the model in this worker thread; hand text to the UI at most every REFRESH_S."""
        pieces: list[str] = []
        shown = 0.0
        events = self.session.send(text)
        try:
            for event in events:
                if isinstance(event, Summary):
                    break
                pieces.append(event.text)
                self.record_routing()
                if time.monotonic() - shown > REFRESH_S:
                    shown = time.monotonic()
                    so_far = "".join(pieces)
                    self.call_from_thread(self.show_reply, reply, so_far)  # type: ignore[arg-type]
                if self.stop_flag.is_set():
                    break
        except (LocalmixError, OSError) as e:  # the barrier, in this thread
            self.call_from_thread(self.notify, str(e), severity="error", timeout=10)
        finally:
            events.close()  # the session keeps the reply, whole or stopped
            self.call_from_thread(self.finish_reply, reply, "".join(pieces))

    def record_routing(self) -> None:
        for layer, chosen in enumerate(self.engine.expert_routing()):
            row = self.activity[layer]
            for e in range(len(row)):
                row[e] *= ACTIVITY_DECAY
            for e in chosen:
                row[e] += 1 - ACTIVITY_DECAY

    async def show_reply(self, reply: ChatMessage, text: str) -> None:
        log = self.query_one("#log", VerticalScroll)
        at_bottom = log.scroll_y >= log.max_scroll_y - 1
        await reply.set_content(text or "…")
        if at_bottom:
            log.scroll_end(animate=False)
        self.refresh_stats()

    @shows_errors
    async def finish_reply(self, reply: ChatMessage, text: str) -> None:
        self.generating = False
        if self.session.stopped:
            reply.border_subtitle = "stopped"  # not in the text: a base model's is shown as is
        await self.show_reply(reply, text)
        self.refresh_sidebar()
        note = context_note(self.last) if self.last is not None else None
        if note and self.cut_said != self.conv.name:  # once per conversation
            self.cut_said = self.conv.name
            self.notify(note, severity="warning", timeout=10)

    # -- stats -----------------------------------------------------------------------------

    def refresh_stats(self) -> None:
        e, s = self.engine, self.last
        mem = e.memory()
        lines = [f"model        {e.name}", f"device       {e.device}"]
        if s is not None:
            lines += [
                f"decode       {s.decode_tokens_per_s:.1f} tok/s",
                f"prefill      {s.prefill_tokens_per_s:.1f} tok/s",
                f"first token  {s.time_to_first_token_s * 1000:.0f} ms",
            ]
        elif self.session.stopped and not self.generating:
            lines.append("last reply   stopped: no figures")
        lines.append(f"context      {e.cache.used}/{e.cache.capacity} tokens")
        lines.append(f"host memory  {mib(mem['host'])}")
        if "device" in mem:
            lines.append(f"device mem.  {mib(mem['device'])}")
        stats = e.stats()
        if stats is not None:
            lines.append(
                f"expert hits  {stats.summary.hit_rate:.1%}  "
                f"({stats.summary.loads_per_token:.1f} loads/token)"
            )
        else:
            lines.append("expert cache all experts resident")
        self.query_one("#stats-text", Static).update("\n".join(lines))
        self.query_one(Heatmap).show(self.activity, e.resident_experts())

    def on_unmount(self) -> None:
        if self.conv.messages:
            self.session.save()  # a failure was already shown while the app ran
