"""Saved conversations in the store: one JSON file each, written atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import LocalmixError
from .store import home

NAME_RE = re.compile(r"^[\w.-]{1,100}$")


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

    def for_engine(self) -> list[dict[str, str]]:
        """Messages with the system prompt in front, as `Engine.chat` takes them."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def save(self) -> Path:
        check_name(self.name)
        self.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
        folder = conversations_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, name: str) -> Conversation:
        check_name(name)
        path = conversations_dir() / f"{name}.json"
        if not path.exists():
            raise LocalmixError(f"no saved conversation '{name}' in {conversations_dir()}")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise LocalmixError(f"{path}: not a saved conversation ({e})") from e


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise LocalmixError(f"'{name}' is not a valid name: use letters, digits, '.', '_', '-'")


def list_conversations() -> list[Conversation]:
    """Saved conversations, newest first."""
    folder = conversations_dir()
    out = []
    for path in folder.glob("*.json") if folder.exists() else []:
        try:
            out.append(Conversation(**json.loads(path.read_text())))
        except (json.JSONDecodeError, TypeError):
            continue
    return sorted(out, key=lambda c: c.updated, reverse=True)


def new_name() -> str:
    return datetime.now().strftime("chat-%Y%m%d-%H%M%S-%f")
