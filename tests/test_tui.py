"""The Textual app, driven with Textual's pilot, and snapshots of its screens."""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest
from localmix.tui.app import LocalmixApp, PromptArea

import localmix
from localmix.conversations import Conversation, list_conversations
from localmix.tokenizer import ChatTemplate


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def engine(home):
    return localmix.load("demo", device="cpu", seed=0, temperature=0, max_tokens=24)


async def send(pilot, text: str) -> None:
    app = pilot.app
    app.query_one(PromptArea).focus()
    await pilot.press(*text)
    await pilot.press("enter")
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
    app = pilot.app
    app.query_one("#set-max_tokens").value = "100000"
    app.query_one(PromptArea).focus()
    await pilot.press(*"go")
    await pilot.press("enter")
    await pilot.press("escape")
    await app.workers.wait_for_complete()
    await pilot.pause()


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
    monkeypatch.setattr("localmix.engine.time.perf_counter", lambda: next(clock))
    monkeypatch.setattr(engine, "memory", lambda: {"host": 300_000_000})
    monkeypatch.setattr("localmix.conversations.datetime", FixedClock)
    return engine


class FixedClock(datetime):
    """A clock at 2026-01-02 03:04, for the sidebar's dates in snapshots."""

    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5, tzinfo=tz)


def test_snapshot_main_screen(deterministic, snap_compare):
    async def chat(pilot):
        await send(pilot, "Write a function")

    app = LocalmixApp(deterministic, blink=False)
    assert snap_compare(app, terminal_size=(130, 40), run_before=chat)


def test_snapshot_stats_panel(deterministic, snap_compare):
    async def chat_then_focus_stats(pilot):
        await send(pilot, "Count experts")
        pilot.app.query_one("#panel").active = "stats"
        await pilot.pause()

    app = LocalmixApp(deterministic, blink=False)
    assert snap_compare(app, terminal_size=(130, 40), run_before=chat_then_focus_stats)
