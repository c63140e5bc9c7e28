"""The Textual app, driven with Textual's pilot, and snapshots of its screens."""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest
from localmix.tui.app import LocalmixApp, PromptArea

import localmix
from localmix import conversations
from localmix.conversations import Conversation, list_conversations
from localmix.tokenizer import ChatTemplate


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def engine(home):
    return localmix.load("demo", device="cpu", seed=0, temperature=0, max_tokens=24)


async def send(pilot, text: str, *, stop: bool = False) -> None:
    """Type `text` in the prompt and send it; with `stop`, press Escape as the reply starts."""
    app = pilot.app
    app.query_one(PromptArea).focus()
    await pilot.press(*text)
    await pilot.press("enter")
    if stop:
        await pilot.press("escape")
    await app.workers.wait_for_complete()
    await pilot.pause()


async def test_send_message_and_see_reply(engine):
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await send(pilot, "hello")
        roles = [m["role"] for m in app.conv.messages]
        assert roles == ["user", "assistant"] and app.conv.messages[1]["content"]
        shown = [w.content for w in app.query("ChatMessage")]
        assert shown[0] == "hello" and shown[1].startswith(app.conv.messages[1]["content"][:10])
        assert app.last is not None and app.last.generated_tokens == 24
        saved, _ = list_conversations()
        assert len(saved) == 1 and saved[0].messages == app.conv.messages


async def test_base_model_reply_keeps_its_lines(engine):
    assert not engine.template.chat_format  # demo is nano, a base model: replies are code
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await send(pilot, "def read_config")
        reply, text = app.query("ChatMessage").last(), app.conv.messages[1]["content"]
        assert "\n" in text and not reply.query("Markdown")
        # Markdown would join the lines into one paragraph; shown as text, each keeps its row.
        assert reply.query_one(".plain").size.height >= text.strip("\n").count("\n") + 1


async def test_chat_model_reply_is_markdown(engine):
    engine.template = ChatTemplate(engine.tokenizer)
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await send(pilot, "hello")
        assert app.query("ChatMessage").last().query("Markdown")
        assert not app.query(".plain")


async def stop_a_long_reply(pilot) -> None:
    pilot.app.query_one("#set-max_tokens").value = "100000"
    await send(pilot, "go", stop=True)


async def test_escape_stops_the_reply(engine):
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await send(pilot, "first")
        assert app.last is not None  # the first reply's figures...
        await stop_a_long_reply(pilot)
        assert not app.generating and app.session.stopped
        assert app.last is None  # ...are not shown for the stopped one
        assert "decode" not in str(app.query_one("#stats-text").render())
        assert "stopped" in str(app.query_one("#stats-text").render())
        assert len(app.conv.messages) == 4  # the partial reply is kept
        reply = app.query("ChatMessage").last()
        assert reply.content == app.conv.messages[-1]["content"]  # no *(stopped)* in a base
        assert "stopped" not in reply.content and reply.border_subtitle == "stopped"  # model's text


async def test_ctrl_n_starts_a_new_chat(engine):
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await send(pilot, "first")
        old = app.conv.name
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.conv.name != old and app.conv.messages == []
        assert len(app.query("ChatMessage")) == 0
        assert engine.cache.used == 0
        assert f"context      0/{engine.cache.capacity}" in str(
            app.query_one("#stats-text").render()
        )


async def test_reopen_saved_conversation_after_restart(home):
    first = localmix.load("demo", device="cpu", seed=0, temperature=0, max_tokens=8)
    app = LocalmixApp(first, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await send(pilot, "remember me")
        name, messages = app.conv.name, list(app.conv.messages)
    second = localmix.load("demo", device="cpu", seed=0, temperature=0, max_tokens=8)
    app = LocalmixApp(second, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        items = app.query("#conversations ListItem")
        assert [i.name for i in items] == [name]
        app.query_one("#conversations").index = 0
        app.query_one("#conversations").action_select_cursor()
        await pilot.pause()
        assert app.conv.name == name and app.conv.messages == messages
        assert [w.content for w in app.query("ChatMessage")] == [m["content"] for m in messages]


async def test_temperature_setting_is_used(engine):
    seen = []
    real = engine.chat

    def spy(messages, **sampling):
        seen.append(sampling)
        return real(messages, **sampling)

    engine.chat = spy
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        app.query_one("#set-temperature").value = "0.3"
        app.query_one("#set-system").value = "be brief"
        await pilot.pause()
        await send(pilot, "hi")
        assert seen[-1]["temperature"] == 0.3
        assert app.conv.for_engine()[0] == {"role": "system", "content": "be brief"}
        app.query_one("#set-temperature").value = "-1"
        await pilot.pause()
        assert app.query_one("#set-temperature").has_class("-invalid")
        assert app.conv.settings["temperature"] == 0.3


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_unreadable_conversations_are_skipped_and_named(engine, home):
    Conversation(name="fine", model="demo", messages=[{"role": "user", "content": "hi"}]).save()
    folder = home / "conversations"
    (folder / "utf8.json").write_bytes(b'{"name": "\xff"}')
    (folder / "list.json").write_text("[1]")
    (folder / "dir.json").mkdir()
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await pilot.pause()
        assert [i.name for i in app.query("#conversations ListItem")] == ["fine"]
        for bad in ("utf8.json", "list.json", "dir.json"):
            assert sum(bad in n for n in notes(app)) == 1
        (folder / "fine.json").write_text('{"messages": 3}')  # spoiled after the listing
        app.query_one("#conversations").index = 0
        app.query_one("#conversations").action_select_cursor()
        await pilot.pause()
        assert any("'messages' must be a list" in n for n in notes(app)), notes(app)
        await send(pilot, "still here")
        assert app.is_running and app.conv.messages[0]["content"] == "still here"


async def test_chat_goes_on_when_nothing_can_be_saved(engine, home):
    home.parent.mkdir(parents=True, exist_ok=True)
    home.write_text("a file where the store should be")
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await send(pilot, "one")
        await send(pilot, "two")
        assert [m["role"] for m in app.conv.messages] == ["user", "assistant"] * 2
        assert sum("not saved" in n for n in notes(app)) == 1
    assert app.return_code in (0, None)


async def test_a_model_error_is_shown_and_the_app_goes_on(engine, monkeypatch):
    from localmix.errors import CheckpointError

    def broken(*a, **k):
        raise CheckpointError("the model computed NaN or infinite logits")

    monkeypatch.setattr(engine, "chat", broken)
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await send(pilot, "hi")
        assert not app.generating and app.is_running
        assert any("NaN" in n for n in notes(app))
        assert app.conv.messages[0] == {"role": "user", "content": "hi"}


@pytest.fixture
def deterministic(engine, monkeypatch):
    """Fixed clock and memory figures, so the stats panel renders the same every run."""
    clock = itertools.count(0, 0.02)
    monkeypatch.setattr(engine, "clock", lambda: next(clock))
    monkeypatch.setattr(engine, "memory", lambda: {"host": 300_000_000})
    monkeypatch.setattr(conversations, "clock", FixedClock.now)
    return engine


class FixedClock(datetime):
    """A clock at 2026-01-02 03:04, for the sidebar's dates in snapshots."""

    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5, tzinfo=tz)


def snapshot(snap_compare, engine, run_before, **options) -> bool:
    """Whether the app on `engine` looks as its stored snapshot after `run_before`."""
    app = LocalmixApp(engine, blink=False, **options)
    return snap_compare(app, terminal_size=(130, 40), run_before=run_before)


def test_snapshot_main_screen(deterministic, snap_compare):
    async def chat(pilot):
        await send(pilot, "Write a function")

    assert snapshot(snap_compare, deterministic, chat)


def test_snapshot_stats_panel(deterministic, snap_compare):
    async def chat_then_focus_stats(pilot):
        await send(pilot, "Count experts")
        pilot.app.query_one("#panel").active = "stats"
        await pilot.pause()

    assert snapshot(snap_compare, deterministic, chat_then_focus_stats)


async def test_chat_tui_takes_the_command_lines_options(home, monkeypatch):
    """`localmix chat demo --tui` with options: F2 opens Settings, which shows them all."""
    from localmix.cli.main import app as cli
    from typer.testing import CliRunner, _NamedTextIOWrapper

    started = []
    monkeypatch.setattr(LocalmixApp, "run", lambda self: started.append(self))
    monkeypatch.setattr(_NamedTextIOWrapper, "isatty", lambda self: True, raising=False)
    args = ["chat", "demo", "--tui", "--temperature", "0", "--max-tokens", "5", "--system", "Hi"]
    more = ["--top-k", "7", "--seed", "3", "--stop", "###", "--context", "64"]
    r = CliRunner().invoke(cli, args + more)
    assert r.exit_code == 0, r.output
    [app] = started
    async with app.run_test(size=(130, 40)) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        assert app.query_one("#panel").active == "settings"
        shown = {k: app.query_one(f"#set-{k}").value for k in ("system", "temperature")}
        shown |= {k: app.query_one(f"#set-{k}").value for k in ("max_tokens", "top_k", "seed")}
        shown |= {k: app.query_one(f"#set-{k}").value for k in ("stop", "context")}
        assert shown == {
            "system": "Hi",
            "temperature": "0.0",
            "max_tokens": "5",
            "top_k": "7",
            "seed": "3",
            "stop": "###",
            "context": "64",
        }
        await send(pilot, "def f():")
        assert app.last.generated_tokens <= 5 and app.conv.system == "Hi"


async def test_tui_has_the_same_options(home, monkeypatch):
    from localmix.cli.main import app as cli
    from typer.testing import CliRunner, _NamedTextIOWrapper

    started = []
    monkeypatch.setattr(LocalmixApp, "run", lambda self: started.append(self))
    monkeypatch.setattr(_NamedTextIOWrapper, "isatty", lambda self: True, raising=False)
    r = CliRunner().invoke(cli, ["tui", "demo", "--top-p", "0.5", "--system", "S"])
    assert r.exit_code == 0, r.output
    assert started[0].session.options.top_p == 0.5 and started[0].session.system == "S"


async def test_a_context_applies_when_submitted_not_per_keystroke(engine, monkeypatch):
    sizes = []
    real = engine.set_context
    monkeypatch.setattr(engine, "set_context", lambda n: (sizes.append(n), real(n)))
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await pilot.press("f2")
        field = app.query_one("#set-context")
        field.focus()
        field.value = ""
        await pilot.press(*"96", "enter")
        await pilot.pause()
        assert sizes == [96] and field.value == "96" and engine.context == 96


async def test_keys_typed_before_anything_has_focus_reach_the_prompt(engine):
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        app.set_focus(None)
        await pilot.press(*"hi there")
        assert app.query_one(PromptArea).text == "hi there"


class StopAfter:
    """A stop flag that is set after `n` looks (a deterministic Esc)."""

    def __init__(self, n: int) -> None:
        self.n, self.looks = n, 0

    def clear(self) -> None:
        self.looks = 0

    def set(self) -> None:
        self.looks = self.n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n


def test_snapshot_settings_panel(deterministic, snap_compare):
    async def open_settings(pilot):
        await pilot.press("f2")
        await pilot.wait_for_scheduled_animations()  # the tab's underline slides
        await pilot.pause()

    settings = {"top_k": 40, "stop": ["###"]}
    assert snapshot(
        snap_compare, deterministic, open_settings, settings=settings, system="Be brief"
    )


def test_snapshot_stopped_reply(deterministic, snap_compare):
    """A base model's stopped reply: marked in its border, its text as written; no figures."""

    async def stop_early(pilot):
        await send(pilot, "Write a function")
        pilot.app.stop_flag = StopAfter(6)
        await send(pilot, "import")

    assert snapshot(snap_compare, deterministic, stop_early)


def test_snapshot_long_code_lines(deterministic, snap_compare):
    """A base model's long lines scroll sideways instead of wrapping to column 1."""

    async def code(pilot):
        pilot.app.session.set("max_tokens", "60")
        await send(pilot, "def read_config")

    assert snapshot(snap_compare, deterministic, code)


def test_snapshot_new_chat(deterministic, snap_compare):
    """After Ctrl+N: an empty log and a context gauge at 0."""

    async def chat_then_new(pilot):
        await send(pilot, "Count experts")
        await pilot.press("ctrl+n")
        await pilot.pause()

    assert snapshot(snap_compare, deterministic, chat_then_new)


async def test_a_chat_longer_than_the_context_is_said(engine):
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        app.query_one(PromptArea).text = "word " * 200  # demo's context holds 128 tokens
        app.query_one(PromptArea).focus()
        await pilot.press("end", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert sum("the context holds 128" in n for n in notes(app)) == 1


def test_text_typed_while_the_app_starts_is_kept(tmp_path):
    """Keys typed while the model loads (before the app owns the terminal) start the prompt."""
    import json
    import os
    import sys
    import time

    import pexpect

    env = dict(os.environ, LOCALMIX_HOME=str(tmp_path), TERM="xterm-256color")
    args = ["-m", "localmix.cli", "chat", "demo", "--tui", "--max-tokens", "2"]
    child = pexpect.spawn(sys.executable, args, env=env, timeout=60, dimensions=(40, 130))
    child.send("early")  # typed at once, while localmix loads
    child.expect("conversations")  # the app has drawn its screen
    child.send(" bird\r")
    folder = tmp_path / "conversations"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(folder.glob("chat-*.json")):
        time.sleep(0.2)
    time.sleep(1)
    child.send("\x11")  # Ctrl+Q
    child.expect(pexpect.EOF)
    [saved] = folder.glob("chat-*.json")
    assert json.loads(saved.read_text())["messages"][0]["content"] == "early bird"
