"""Driving `localmix chat` in a real terminal (a pty, with pexpect), as the chat tests do."""

from __future__ import annotations

import os
import re
import sys

import pexpect

PROMPT = ">>> "


def spawn_chat(*args: str, env: dict[str, str] | None = None, python: tuple[str, ...] = ()):
    """`python PYTHON -m localmix.cli chat ARGS` in a terminal 120 columns wide."""
    return pexpect.spawn(
        sys.executable,
        [*python, "-m", "localmix.cli", "chat", *args],
        env={**os.environ, "COLUMNS": "120", **(env or {})},
        encoding="utf-8",
        timeout=60,
    )


def say(child: pexpect.spawn, line: str) -> None:
    """Type a line and wait for the next prompt."""
    child.sendline(line)
    child.expect(PROMPT)


def stop_a_reply(child: pexpect.spawn, line: str, said: str, interrupts: int = 1) -> None:
    """Send `line`, wait until its reply streams, stop it with Ctrl+C (`interrupts` times), and
    wait for the chat to say `said` and prompt again."""
    child.sendline(line)
    child.expect(re.escape(line) + "\r\n")  # the terminal's echo
    child.expect(r"\S{3}")  # the reply is streaming
    for _ in range(interrupts):
        child.sendintr()
    child.expect(said)
    child.expect(PROMPT)


def leave(child: pexpect.spawn) -> None:
    """/bye, and the chat ends with status 0."""
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
