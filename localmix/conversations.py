"""Saved conversations in the store: one JSON file each, written atomically.

A file is read through one gate, `read_conversation`, which checks every field and turns
anything else (bad UTF-8, another JSON shape, a directory, settings out of range) into a
`LocalmixError` that names the file. A conversation is known by its file's name: the name
written inside a file is not trusted, so a copied file saves to the copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import LocalmixError
from .sampling import SamplingOptions
from .store import home
from .text import valid_text

NAME_RE = re.compile(r"^[\w.-]{1,100}$")
ROLES = ("user", "assistant")


def clock(tz: timezone | None = None) -> datetime:
    """The time conversations are dated and named by: now (tests set a fixed one)."""
    return datetime.now(tz)


def conversations_dir() -> Path:
    return home() / "conversations"


@dataclass
class Conversation:
    """A chat: its model, system prompt, messages and sampling settings."""

    name: str
    model: str
    system: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, object] = field(default_factory=dict)
    updated: str = ""

    @property
    def title(self) -> str:
        """The first line of the first user message (what a list of chats shows)."""
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        lines = first.strip().splitlines()
        return lines[0] if lines else "(empty)"

    def for_engine(self) -> list[dict[str, str]]:
        """Messages with the system prompt in front, as `Engine.chat` takes them."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def save(self) -> Path:
        """Write the conversation to its file (atomically); an OSError becomes a LocalmixError."""
        path = conversation_path(self.name)
        # microseconds: saves within one second still sort newest first (`run -c`)
        self.updated = clock(timezone.utc).isoformat(timespec="microseconds")
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(self), f, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise LocalmixError(
                f"cannot save conversation '{self.name}' in {path.parent}: {e.strerror or e}"
            ) from e
        return path

    @classmethod
    def load(cls, name: str) -> Conversation:
        """The saved conversation `name`, checked whole (see `read_conversation`)."""
        path = conversation_path(name)
        if not path.exists():
            raise LocalmixError(f"no saved conversation '{name}' in {conversations_dir()}")
        return read_conversation(path)


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or name.startswith("."):
        raise LocalmixError(f"'{name}' is not a valid name: use letters, digits, '.', '_', '-'")


def conversation_path(name: str) -> Path:
    """The file of conversation `name`: always directly inside `conversations_dir()`."""
    check_name(name)
    return conversations_dir() / f"{name}.json"


def read_conversation(path: Path) -> Conversation:
    """The one gate for a conversation file: a checked Conversation, or a LocalmixError."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise LocalmixError(f"{path}: cannot read it ({e.strerror or e})") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LocalmixError(f"{path}: not a saved conversation (not JSON in UTF-8)") from e
    if not isinstance(raw, dict):
        raise LocalmixError(f"{path}: not a saved conversation (expected a JSON object)")

    def text(key: str) -> str:
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise LocalmixError(f"{path}: '{key}' must be a string")
        return valid_text(value)

    messages = raw.get("messages", [])
    if not isinstance(messages, list):
        raise LocalmixError(f"{path}: 'messages' must be a list")
    checked = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise LocalmixError(
                f"{path}: message {i} must be {{'role': 'user' or 'assistant', 'content': text}}"
            )
        checked.append({"role": m["role"], "content": valid_text(m["content"])})
    settings = raw.get("settings", {})
    if not isinstance(settings, dict):
        raise LocalmixError(f"{path}: 'settings' must be an object")
    try:
        SamplingOptions().updated(**settings)
    except LocalmixError as e:
        raise LocalmixError(f"{path}: {e}") from e
    return Conversation(
        name=path.stem,
        model=text("model"),
        system=text("system"),
        messages=checked,
        settings=dict(settings),
        updated=text("updated"),
    )


def list_conversations() -> tuple[list[Conversation], list[str]]:
    """Saved conversations, newest first, and a line for each file that could not be read."""
    folder = conversations_dir()
    out, problems = [], []
    try:
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    except OSError as e:
        return [], [f"{folder}: cannot list it ({e.strerror or e})"]
    for path in paths:
        if path.name.startswith("."):  # a save's temporary file
            continue
        try:
            check_name(path.stem)
            out.append(read_conversation(path))
        except LocalmixError as e:
            problems.append(f"skipped {path.name}: {e}")
    return sorted(out, key=lambda c: c.updated, reverse=True), problems


def latest_conversation() -> Conversation:
    """The conversation saved last (what `run --continue` goes on with)."""
    conversations, _ = list_conversations()
    if not conversations:
        raise LocalmixError(f"no saved conversation in {conversations_dir()} to continue")
    return conversations[0]


def remove_file(path: Path) -> None:
    """Delete a conversation's file; one already gone is fine."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise LocalmixError(f"cannot delete {path}: {e.strerror or e}") from e


def delete_conversation(name: str) -> Path:
    """Delete the saved conversation `name`; returns the path it had."""
    path = conversation_path(name)
    if not path.exists():
        raise LocalmixError(f"no saved conversation '{name}' in {conversations_dir()}")
    remove_file(path)
    return path


def rename_conversation(old: str, new: str, *, force: bool = False) -> Path:
    """Give the saved conversation `old` the name `new` (never over another unless `force`)."""
    source, target = conversation_path(old), conversation_path(new)
    if not source.exists():
        raise LocalmixError(f"no saved conversation '{old}' in {conversations_dir()}")
    if target.exists() and old != new and not force:
        raise LocalmixError(f"a conversation named '{new}' is already saved; choose another name")
    try:
        os.replace(source, target)
    except OSError as e:
        raise LocalmixError(f"cannot rename {source}: {e.strerror or e}") from e
    return target


def new_name() -> str:
    return clock().strftime("chat-%Y%m%d-%H%M%S-%f")
