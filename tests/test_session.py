"""The library's chat session: turns, settings, saving, stopped replies, new chats."""

from __future__ import annotations

import pytest

import localmix
from localmix.conversations import (
    Conversation,
    conversations_dir,
    delete_conversation,
    latest_conversation,
    list_conversations,
    rename_conversation,
)
from localmix.engine import Summary, TokenEvent
from localmix.errors import LocalmixError, OptionError
from localmix.session import ChatSession, context_note


@pytest.fixture(scope="module")
def engine():
    return localmix.load("demo", device="cpu", seed=0, temperature=0, max_tokens=4)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_reply_is_a_turn_and_is_saved(engine):
    session = ChatSession(engine)
    events = list(session.send("hello"))
    assert isinstance(events[-1], Summary) and all(isinstance(e, TokenEvent) for e in events[:-1])
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"] == events[-1].text and not session.stopped
    assert Conversation.load(session.conversation.name).messages == session.messages


def test_a_stopped_reply_keeps_its_text(engine):
    session = ChatSession(engine)
    session.set("max_tokens", "50")
    events = session.send("go on")
    first = [next(events).text for _ in range(3)]
    events.close()
    assert session.stopped and session.last is None
    assert session.messages[-1] == {"role": "assistant", "content": "".join(first)}


def test_settings_are_checked_by_sampling_options(engine):
    session = ChatSession(engine, autosave=False)
    assert session.set("top_k", "40") == 40 and session.options.top_k == 40
    assert session.set("stop", "###|User:") == ("###", "User:")
    assert session.options.stop == ("###", "User:")
    for name, value in [("top_p", "0"), ("seed", "-1"), ("bogus", "1"), ("temperature", "x")]:
        with pytest.raises(OptionError):
            session.set(name, value)
    with pytest.raises(OptionError):
        session.update({"temperature": 0.5, "top_p": 2.0})
    assert "temperature" not in session.conversation.settings  # nothing of a refused batch


def test_a_new_chat_copies_the_settings(engine):
    session = ChatSession(engine, autosave=False)
    session.set("temperature", "0.2")
    session.system = "be brief"
    session.reply("hi")
    old = session.conversation
    session.new_chat()
    session.set("temperature", "0.9")
    assert old.settings == {"temperature": 0.2} and session.system == "be brief"
    assert session.messages == [] and session.last is None and engine.cache.used == 0


def test_save_as_leaves_no_autosaved_duplicate(engine):
    session = ChatSession(engine)
    session.reply("hello")
    auto = session.conversation.name
    session.save_as("named")
    names = [c.name for c in list_conversations()[0]]
    assert names == ["named"] and auto not in names
    with pytest.raises(LocalmixError, match="not a valid name"):
        session.save_as("../up")
    session.reply("more")
    assert len(Conversation.load("named").messages) == 4


def test_save_as_keeps_an_opened_conversation(engine):
    Conversation(name="orig", model="demo", messages=[{"role": "user", "content": "a"}]).save()
    session = ChatSession(engine)
    session.open("orig")
    session.save_as("copy")
    assert {c.name for c in list_conversations()[0]} == {"orig", "copy"}


def test_renaming_an_opened_conversation_moves_it(engine):
    Conversation(name="orig", model="demo", messages=[{"role": "user", "content": "a"}]).save()
    session = ChatSession(engine)
    session.open("orig")
    session.rename("moved")
    assert [c.name for c in list_conversations()[0]] == ["moved"]


def test_rename_delete_latest(engine):
    Conversation(name="a", model="demo").save()
    Conversation(name="b", model="demo").save()
    assert latest_conversation().name in ("a", "b")
    with pytest.raises(LocalmixError, match="already saved"):
        rename_conversation("a", "b")
    rename_conversation("a", "c")
    assert not (conversations_dir() / "a.json").exists() and Conversation.load("c")
    delete_conversation("c")
    with pytest.raises(LocalmixError, match="no saved conversation"):
        delete_conversation("c")


def test_a_prompt_longer_than_the_context_is_said(engine):
    session = ChatSession(engine, autosave=False)
    summary = session.reply("word " * 200)  # demo holds 128 tokens
    assert summary.prompt_tokens > summary.context_size
    assert "the reply saw only the last part" in context_note(summary)
    assert context_note(ChatSession(engine, autosave=False).reply("hi")) is None
