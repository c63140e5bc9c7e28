"""The Textual chat app: streaming Markdown replies, saved conversations, settings, live stats.

The model runs in a worker thread; the UI only renders the engine's events. Keys: Enter sends,
Ctrl+J inserts a newline, Esc stops a reply, Ctrl+N starts a new chat, Ctrl+Q quits.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
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

from localmix.conversations import Conversation, list_conversations, new_name
from localmix.engine import Engine, Summary
from localmix.errors import LocalmixError
from localmix.sampling import SamplingOptions

SAVE_EVERY = 32  # tokens between saves of a reply being written
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
    indentation kept) for a base model, whose replies continue code or prose."""

    def __init__(self, role: str, content: str, *, markdown: bool = True) -> None:
        super().__init__(classes=f"message {role}")
        self.role, self.content, self.markdown = role, content, markdown
        self.border_title = "you" if role == "user" else "localmix"

    def compose(self) -> ComposeResult:
        if self.markdown:
            yield Markdown(printable(self.content))
        else:
            yield Static(Text(printable(self.content)), classes="plain")

    async def set_content(self, content: str) -> None:
        self.content = content
        if self.markdown:
            await self.query_one(Markdown).update(printable(content))
        else:
            self.query_one(".plain", Static).update(Text(printable(content)))


class LocalmixApp(App):
    """Chat with a local model, with the expert machinery in view."""

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
    PromptArea { height: 5; border: round $accent; }
    #stats-text { height: auto; }
    .setting { height: auto; }
    .setting Label { margin: 1 0 0 0; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, engine: Engine, *, blink: bool = True) -> None:
        super().__init__()
        self.engine = engine
        self.blink = blink
        self.conv = Conversation(name=new_name(), model=engine.name)
        self.stop_flag = threading.Event()
        self.generating = False
        layers = len(engine.model.moe_layers())
        self.activity = [[0.0] * engine.config.num_local_experts for _ in range(layers)]
        self.last: Summary | None = None
        self.sub_title = engine.name
        self.said: set[str] = set()  # problems already shown (a save that fails, a bad file)

    def say_once(self, problem: str) -> None:
        if problem not in self.said:
            self.said.add(problem)
            self.notify(problem, severity="warning", timeout=10)

    def autosave(self) -> None:
        """Save as the chat goes; a failure is shown once and the chat goes on."""
        try:
            self.conv.save()
        except LocalmixError as e:
            self.say_once(f"not saved: {e}")

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
                with TabPane("Settings", id="settings"):
                    yield from self._settings()
        yield Footer()

    def _settings(self) -> ComposeResult:
        d = self.engine.defaults
        fields = [
            ("system", "system prompt", ""),
            ("temperature", "temperature (0 = greedy)", str(d.temperature)),
            ("top_p", "top-p", str(d.top_p)),
            ("max_tokens", "max tokens per reply", str(d.max_tokens)),
            ("context", "context window (tokens)", str(self.engine.context)),
        ]
        for key, label, value in fields:
            with Vertical(classes="setting"):
                yield Label(label)
                yield Input(value=value, id=f"set-{key}")

    @shows_errors
    def on_mount(self) -> None:
        self.refresh_sidebar()
        self.refresh_stats()
        self.query_one(PromptArea).focus()

    # -- conversations ---------------------------------------------------------------------

    def refresh_sidebar(self) -> None:
        view = self.query_one("#conversations", ListView)
        view.clear()
        conversations, problems = list_conversations()
        for problem in problems:  # one unreadable file does not hide the others
            self.say_once(problem)
        for conv in conversations:
            first = next((m["content"] for m in conv.messages if m["role"] == "user"), "(empty)")
            title = first.strip().splitlines()[0][:24] if first.strip() else "(empty)"
            item = ListItem(Label(title), name=conv.name)
            view.append(item)

    @on(ListView.Selected, "#conversations")
    @shows_errors
    async def open_conversation(self, event: ListView.Selected) -> None:
        if self.generating or event.item.name is None:
            return
        self.conv = Conversation.load(event.item.name)
        self.engine.reset()
        await self.show_conversation()

    async def show_conversation(self) -> None:
        log = self.query_one("#log", VerticalScroll)
        await log.remove_children()
        await log.mount_all([self.message(m["role"], m["content"]) for m in self.conv.messages])
        log.scroll_end(animate=False)
        self.query_one("#set-system", Input).value = self.conv.system
        for key in ("temperature", "top_p", "max_tokens"):
            if key in self.conv.settings:
                self.query_one(f"#set-{key}", Input).value = str(self.conv.settings[key])

    @shows_errors
    async def action_new_chat(self) -> None:
        if self.generating:
            self.action_stop()
            return
        self.conv = Conversation(
            name=new_name(),
            model=self.engine.name,
            system=self.conv.system,
            settings=dict(self.conv.settings),
        )
        self.engine.reset()
        await self.query_one("#log", VerticalScroll).remove_children()
        self.query_one(PromptArea).focus()

    # -- settings --------------------------------------------------------------------------

    @on(Input.Changed)
    @shows_errors
    def setting_changed(self, event: Input.Changed) -> None:
        key = (event.input.id or "").removeprefix("set-")
        value = event.value.strip()
        event.input.remove_class("-invalid")
        try:
            if key == "system":
                self.conv.system = event.value
            elif key in ("temperature", "top_p", "max_tokens"):
                self.conv.settings[key] = SamplingOptions.parse(key, value)
            elif key == "context" and int(value) != self.engine.context and not self.generating:
                self.engine.set_context(int(value))
                self.refresh_stats()
        except ValueError:
            event.input.add_class("-invalid")

    # -- chatting --------------------------------------------------------------------------

    @on(PromptArea.Submitted)
    @shows_errors
    async def send(self, event: PromptArea.Submitted) -> None:
        if self.generating:
            self.bell()
            return
        self.conv.messages.append({"role": "user", "content": event.text})
        self.autosave()
        log = self.query_one("#log", VerticalScroll)
        reply = self.message("assistant", "…")
        await log.mount_all([self.message("user", event.text), reply])
        log.scroll_end(animate=False)
        self.generating = True
        self.stop_flag.clear()
        self.generate(reply)

    def message(self, role: str, content: str) -> ChatMessage:
        return ChatMessage(role, content, markdown=self.engine.template.chat_format)

    def action_stop(self) -> None:
        if self.generating:
            self.stop_flag.set()

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, reply: ChatMessage) -> None:
        """Run the model in this worker thread; hand text to the UI at most every REFRESH_S."""
        pieces: list[str] = []
        shown = 0.0
        events = None
        try:
            events = self.engine.chat(self.conv.for_engine(), **self.conv.settings)
            for event in events:
                if isinstance(event, Summary):
                    self.last = event
                    break
                pieces.append(event.text)
                self.record_routing()
                if len(pieces) % SAVE_EVERY == 0:
                    self.save_partial("".join(pieces))
                if time.monotonic() - shown > REFRESH_S:
                    shown = time.monotonic()
                    self.call_from_thread(self.show_reply, reply, "".join(pieces))
                if self.stop_flag.is_set():
                    break
        except (LocalmixError, OSError) as e:  # the barrier, in this thread
            self.call_from_thread(self.notify, str(e), severity="error", timeout=10)
        finally:
            if events is not None:
                events.close()
            self.call_from_thread(self.finish_reply, reply, "".join(pieces))

    def save_partial(self, text: str) -> None:
        conv = Conversation(**{**vars(self.conv), "messages": list(self.conv.messages)})
        conv.messages.append({"role": "assistant", "content": text})
        try:
            conv.save()
        except LocalmixError:
            pass  # the save at the end of the reply says what is wrong

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
        stopped = self.stop_flag.is_set()
        await self.show_reply(reply, text + ("\n\n*(stopped)*" if stopped else ""))
        self.conv.messages.append({"role": "assistant", "content": text})
        self.autosave()
        self.refresh_sidebar()
        self.refresh_stats()

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
        lines.append(f"context      {e.cache.used}/{e.cache.capacity} tokens")
        lines.append(f"host memory  {mem['host'] / 1e6:.0f} MB")
        if "device" in mem:
            lines.append(f"device mem.  {mem['device'] / 1e6:.0f} MB")
        stats = e.stats()
        if stats:
            lines.append(
                f"expert hits  {stats['hit_rate']:.1%}  "
                f"({stats['loads_per_token']:.1f} loads/token)"
            )
        else:
            lines.append("expert cache all experts resident")
        self.query_one("#stats-text", Static).update("\n".join(lines))
        self.query_one(Heatmap).show(self.activity, e.resident_experts())

    def on_unmount(self) -> None:
        if self.conv.messages:
            try:
                self.conv.save()
            except LocalmixError:
                pass  # already shown while the app ran (`autosave`)
