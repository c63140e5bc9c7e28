"""`localmix chat` in a real terminal (a pty, driven with pexpect), as a user types into it."""

from __future__ import annotations

import pexpect

from localmix.conversations import list_conversations
from tests.chat_pty import PROMPT, leave, say, spawn_chat, stop_a_reply


def start(home, *args: str, prompt: bool = True) -> pexpect.spawn:
    child = spawn_chat("demo", "--seed", "1", *args, env={"LOCALMIX_HOME": str(home)})
    if prompt:
        child.expect(PROMPT)
    return child


def test_a_user_session_in_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    child = start(tmp_path)
    child.sendline("/set max_tokens 4")
    child.expect("max_tokens = 4")
    child.expect(">>> ")
    child.send("\x1b[A")  # up arrow: the last line comes back, to be edited
    child.send("\b5\r")  # max_tokens 5
    child.expect("max_tokens = 5")
    child.expect(">>> ")

    child.sendline("/save ../outside")  # refused...
    child.expect("not a valid name")
    child.expect(">>> ")
    child.sendline("def greet(name):")  # ...and the next message gets its reply
    child.expect("def greet\\(name\\):\r\n")  # the terminal's echo
    child.expect(">>> ")
    reply = child.before.strip()
    assert reply and "error" not in reply

    child.sendline("/list")
    child.expect(r"\* (chat-\S+)\s+\d{4}-\d\d-\d\d \d\d:\d\d\s+2 messages\s+def greet\(name\):")
    name = child.match.group(1)
    child.expect(">>> ")

    say(child, "/set max_tokens 100000")
    stop_a_reply(child, "go on", "stopped", interrupts=2)  # twice: the reply stops, the chat stays
    leave(child)

    [conv], _ = list_conversations()
    assert conv.name == name and [m["role"] for m in conv.messages] == ["user", "assistant"] * 2
    assert conv.messages[1]["content"].strip() == reply.replace("\r\n", "\n").strip()
    assert conv.messages[3]["content"]  # the stopped reply is kept
    assert not (tmp_path / "outside.json").exists()


def test_load_shows_the_conversation_and_save_leaves_no_duplicate(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    child = start(tmp_path, "--max-tokens", "3")
    child.sendline("import os")
    child.expect(">>> ")
    child.sendline("/save mine")
    child.expect("saved as mine")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    assert [c.name for c in list_conversations()[0]] == ["mine"]  # no autosaved copy

    child = start(tmp_path, "--load", "mine", prompt=False)  # shown before the first prompt
    child.expect("mine: 2 messages")
    child.expect(">>> import os")
    child.expect("/help for commands")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
