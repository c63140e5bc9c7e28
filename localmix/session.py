"""One chat's life in the library: its turns, settings, saving and streamed replies.

The REPL (`localmix chat`), the TUI and a server share this class and keep only input and
rendering. A reply is a stream of the engine's events; whoever consumes it may stop at any
moment (Ctrl+C, Esc, a closed connection) and the text written so far is kept as the reply:

    session = ChatSession(engine)
    session.set("temperature", "0")         # checked by SamplingOptions, like every setting
    for event in session.send("Hello"):     # TokenEvents, then a Summary
        print(event.text if isinstance(event, TokenEvent) else "", end="")
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .conversations import Conversation, conversation_path, new_name, remove_file
from .errors import LocalmixError, OptionError
from .events import ChatEngine, Event, Summary
from .sampling import SETTABLE, SamplingOptions
from .text import valid_text

if TYPE_CHECKING:  # a client of `localmix serve` chats without PyTorch (cli/client.py)
    from .engine import Progress

SAVE_EVERY = 32  # tokens between saves of a reply being written
STOP_SEPARATOR = "|"  # stop strings typed as one line: "###|User:"
SETTINGS = (*SETTABLE, "stop")  # what `ChatSession.set` takes, as text


def parse_setting(name: str, text: str) -> object:
    """A sampling setting typed as text (`/set top_k 40`, a TUI field), converted and checked
    by `SamplingOptions`. Stop strings are separated by '|' ('' clears them)."""
    if name != "stop":
        return SamplingOptions.parse(name, text)
    stops = tuple(s for s in text.split(STOP_SEPARATOR) if s)
    SamplingOptions().updated(stop=stops)
    return stops


def format_setting(value: object) -> str:
    """A setting's value as `parse_setting` reads it back."""
    if isinstance(value, (tuple, list)):
        return STOP_SEPARATOR.join(value)
    return str(value)


def context_note(summary: Summary) -> str | None:
    """What to tell a user whose prompt was longer than the context window (its start was not
    seen by the reply), or None."""
    if summary.prompt_tokens <= summary.context_size:
        return None
    return (
        f"the prompt (the conversation so far) is {summary.prompt_tokens} tokens and the "
        f"context holds {summary.context_size}: the reply saw only the last part of it "
        "(a larger --context, or a new chat, keeps more in view)"
    )


class ChatSession:
    """A conversation with a loaded model: messages, system prompt, sampling settings and the
    last reply's figures, saved as it goes (unless `autosave` is False).

    Settings live in the conversation (`conversation.settings`, only the ones changed from the
    engine's defaults) and pass `SamplingOptions`' checks when they are set; `options` is what
    the next reply uses. Saving problems do not stop the chat: `save_problem` holds the last
    one, and `on_save_problem` (if given) is told each new one once.
    """

    def __init__(
        self,
        engine: ChatEngine,
        conversation: Conversation | None = None,
        *,
        autosave: bool = True,
        on_save_problem: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.conversation = conversation or Conversation(name=new_name(), model=engine.name)
        self.autosaving = autosave
        self.on_save_problem = on_save_problem
        self.save_problem: str | None = None
        self.last: Summary | None = None  # the figures of the reply last written, if it finished
        self.stopped = False  # whether the last reply was stopped before its end
        self.named = conversation is not None  # False: an automatic name, this session's own

    # -- settings ---------------------------------------------------------------------------

    @property
    def options(self) -> SamplingOptions:
        """The sampling options of the next reply: the engine's defaults and this chat's."""
        return self.engine.defaults.updated(**self.conversation.settings)

    @property
    def system(self) -> str:
        return self.conversation.system

    @system.setter
    def system(self, text: str) -> None:
        self.conversation.system = valid_text(text)

    def set(self, name: str, value: object) -> object:
        """Set one sampling option; text is parsed (`parse_setting`), any value is checked.
        Returns the value stored; a bad name or value is an `OptionError` and changes nothing."""
        if isinstance(value, str):
            if name not in SETTINGS:
                raise OptionError(f"unknown setting '{name}'; use {', '.join(SETTINGS)}")
            value = parse_setting(name, value)
        self.options.updated(**{name: value})  # checked before it is kept
        stored = list(value) if isinstance(value, (tuple, list)) else value  # stop strings
        self.conversation.settings[name] = stored
        return value

    def update(self, settings: Mapping[str, object]) -> None:
        """Set several options at once (a command line's): all checked before any is kept."""
        self.options.updated(**settings)
        for name, value in settings.items():
            self.set(name, value)

    # -- the conversation ------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.conversation.messages

    def new_chat(self) -> None:
        """Start over in a new conversation with a copy of this one's system prompt and
        settings; the current one stays saved."""
        old = self.conversation
        self.conversation = Conversation(
            name=new_name(), model=self.engine.name, system=old.system, settings=dict(old.settings)
        )
        self.named, self.last, self.stopped = False, None, False
        self.engine.reset()

    def open(self, name: str) -> Conversation:
        """Continue the saved conversation `name` (checked whole: a bad file changes nothing)."""
        self.conversation = Conversation.load(name)
        self.named, self.last, self.stopped = True, None, False
        self.engine.reset()
        return self.conversation

    def save(self) -> Path | None:
        """Save now; a failure is kept in `save_problem` (and told once), not raised."""
        try:
            path = self.conversation.save()
        except LocalmixError as e:
            if str(e) != self.save_problem and self.on_save_problem is not None:
                self.on_save_problem(str(e))
            self.save_problem = str(e)
            return None
        self.save_problem = None
        return path

    def save_as(self, name: str, *, force: bool = False) -> Path:
        """Save under `name`, which never replaces another conversation unless `force`; the
        file saved so far under an automatic name goes (no duplicate is left behind)."""
        path = conversation_path(name)  # checks the name
        if name != self.conversation.name and path.exists() and not force:
            raise LocalmixError(
                f"a conversation named '{name}' is already saved; `/save {name} --force` "
                "replaces it"
            )
        previous, was_named = self.conversation.name, self.named
        self.conversation.name = name
        try:
            path = self.conversation.save()
        except LocalmixError:
            self.conversation.name = previous
            raise
        self.save_problem, self.named = None, True
        if previous != name and not was_named:
            remove_file(conversation_path(previous))
        return path

    def rename(self, name: str, *, force: bool = False) -> Path:
        """Move this conversation to `name`: saved there, and its file under the old name gone."""
        previous = self.conversation.name
        path = self.save_as(name, force=force)
        if previous != name:
            remove_file(conversation_path(previous))
        return path

    # -- replies -----------------------------------------------------------------------------

    def send(self, text: str, *, progress: Progress | None = None) -> Generator[Event, None, None]:
        """Add a user turn and stream the reply's events (TokenEvents, then a Summary).

        The reply is added to the conversation however the stream ends: at its end, when its
        consumer stops early (`close()`, a `break`, Ctrl+C), or on an error; `stopped` says
        whether it was cut short. A reply being written is saved every SAVE_EVERY tokens.
        """
        self.conversation.model = self.engine.name  # the model that wrote its last reply
        self.conversation.messages.append({"role": "user", "content": valid_text(text)})
        self.last, self.stopped = None, True
        self._autosave()
        pieces: list[str] = []
        events = None
        try:
            events = self.engine.chat(
                self.conversation.for_engine(), progress=progress, **self.conversation.settings
            )
            for event in events:
                if isinstance(event, Summary):
                    self.last, self.stopped = event, False
                else:
                    pieces.append(event.text)
                    if len(pieces) % SAVE_EVERY == 0:
                        self._save_partial("".join(pieces))
                yield event
        finally:
            self.conversation.messages.append({"role": "assistant", "content": "".join(pieces)})
            try:
                if events is not None:
                    events.close()
            finally:
                self._autosave()

    def reply(self, text: str) -> Summary:
        """Add a user turn and return the whole reply's Summary."""
        *_, summary = self.send(text)
        if not isinstance(summary, Summary):
            raise RuntimeError("a reply ended without its Summary")
        return summary

    def _autosave(self) -> None:
        if self.autosaving:
            self.save()

    def _save_partial(self, text: str) -> None:
        """Save the conversation with the reply written so far (it survives a crash)."""
        if not self.autosaving:
            return
        conv = self.conversation
        partial = Conversation(
            **{**vars(conv), "messages": [*conv.messages, {"role": "assistant", "content": text}]}
        )
        try:
            partial.save()
        except LocalmixError:
            pass  # the save at the end of the reply says what is wrong
