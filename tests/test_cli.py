"""The command line: CliRunner for each command, real processes for pipes and the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pexpect
import pytest
from localmix.cli.main import app
from typer.testing import CliRunner

from localmix.conversations import Conversation, conversations_dir, list_conversations
from localmix.demo import DEMO_CONFIG, builtin_note, demo_tokenizer_path, write_checkpoint
from localmix.store import models_dir
from tests.chat_pty import PROMPT, leave, say, spawn_chat, stop_a_reply

NOTE = builtin_note()[:20]

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def test_run_streams_reply_only():
    r = invoke("run", "demo", "def f():", "--max-tokens", "8", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and NOTE not in r.stdout
    assert NOTE in r.stderr


def test_run_json_and_stdin_before_prompt():
    r = invoke(
        "run",
        "demo",
        "Summarize:",
        "--json",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        input="some piped text\n",
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["generated_tokens"] == 6 == len(data["token_ids"]) and isinstance(data["text"], str)
    direct = invoke(
        "run",
        "demo",
        "some piped text\n\nSummarize:",
        "--json",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    )
    assert json.loads(direct.stdout)["token_ids"] == data["token_ids"]


def test_run_options_and_verbose():
    r = invoke(
        "run",
        "demo",
        "x",
        "--raw",
        "--max-tokens",
        "4",
        "--temperature",
        "0.5",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--seed",
        "3",
        "--stop",
        "zzz",
        "--context",
        "64",
        "--verbose",
    )
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stderr and "context" in r.stderr and "/64" in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "no-such-model", "hi"], "no model 'no-such-model'"),
        (["run", "demo", "hi", "--raw", "--system", "x"], "--system needs the chat template"),
        (["run", "demo"], "no prompt"),
        (["run", "demo", "hi", "--top-p", "0"], "top_p"),
        (["rm", "nothing"], "no model 'nothing'"),
    ],
)
def test_user_errors_are_one_line(args, message):
    r = invoke(*args)
    assert r.exit_code == 1
    assert message in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()[-1]) > 10


def test_default_model(monkeypatch, tmp_path):
    from localmix.errors import LocalmixError
    from localmix.workflows import default_model

    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    with pytest.raises(LocalmixError, match="localmix pull mistralai/Mixtral-8x7B.*demo"):
        default_model()
    write_checkpoint(models_dir() / "org--only", DEMO_CONFIG, demo_tokenizer_path(), seed=0)
    assert default_model() == "org/only"
    r = invoke("run", "--max-tokens", "2", input="")
    assert r.exit_code == 1 and "no prompt" in r.stderr


def test_list_show_rm():
    write_checkpoint(models_dir() / "org--small", DEMO_CONFIG, demo_tokenizer_path(), seed=0)
    r = invoke("list")
    assert r.exit_code == 0 and "org/small" in r.stdout and "NAME" in r.stdout and "MB" in r.stdout
    r = invoke("show", "org/small")
    assert r.exit_code == 0
    assert "mixtral" in r.stdout and "active per token" in r.stdout
    assert "tokenizer.model" in r.stdout and "placement" in r.stdout
    assert invoke("run", "org/small", "x", "--max-tokens", "2").exit_code == 0
    r = invoke("rm", "org/small")
    assert r.exit_code == 0 and "org/small" not in invoke("list").stdout
    assert invoke("show", "demo").exit_code == 0  # the built-in model is not in the store


def test_chat_refuses_pipes():
    r = invoke("chat", "demo", input="hello\n")
    assert r.exit_code == 1 and "localmix run" in r.stderr


def test_pipe_leaves_only_the_reply(tmp_path):
    out = tmp_path / "out.txt"
    cmd = f'echo "some text" | {sys.executable} -m localmix.cli run demo "Summarize:" --max-tokens 12 --seed 0 > {out}'
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.strip() and "\x1b[" not in text and NOTE not in text
    assert NOTE in proc.stderr and "\x1b[" not in proc.stderr


def test_chat_in_a_terminal():
    child = spawn_chat("demo", "--seed", "1", "--max-tokens", "100000")
    child.expect(PROMPT)
    child.sendline("/set max_tokens 5")
    child.expect("max_tokens = 5")
    child.expect(PROMPT)
    say(child, "hello")  # a reply of 5 tokens, then the prompt again
    say(child, "/set max_tokens 100000")
    stop_a_reply(child, "write forever", "reply stopped")
    say(child, "/set max_tokens 3")
    say(child, "and another")
    child.sendline("/save mytalk")
    child.expect("saved as mytalk")
    leave(child)
    conv = Conversation.load("mytalk")
    roles = [m["role"] for m in conv.messages]
    assert roles == ["user", "assistant"] * 3
    assert conv.messages[2]["content"] == "write forever" and conv.messages[3]["content"]
    assert (conversations_dir() / "mytalk.json").exists()


def test_version_short_help_completion_and_a_lone_prompt():
    runner = CliRunner()
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("localmix ")
    for flag in ("-h", "--help"):
        r = runner.invoke(app, [flag])
        assert r.exit_code == 0 and "Usage" in r.stdout and "--install-completion" in r.stdout
    r = runner.invoke(app, ["run", "-h"])
    assert r.exit_code == 0 and "--threads" in r.stdout
    # one argument that names no model is the prompt, for the store's only model
    r = runner.invoke(app, ["run", "Hello"])
    assert r.exit_code == 1 and "no model in the store yet" in r.stderr, r.output
    r = runner.invoke(app, ["run", "demo"])
    assert r.exit_code == 1 and "no prompt" in r.stderr


def test_top_level_help_is_light_and_whole():
    """`localmix --help` draws its panels without typer's Markdown renderer, loads no PyTorch,
    and shows each command's first paragraph whole (plain click help cuts them with '...')."""
    import typer

    env = dict(os.environ, COLUMNS="80", TERMINAL_WIDTH="80")
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "localmix.cli", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "localmix.engine", "rich.markdown", "typer.rich_utils"}
    shown = " ".join(r.stdout.replace("│", " ").split())
    group = typer.main.get_group(app)
    for name, command in group.commands.items():
        first = " ".join((command.help or "").split("\n\n")[0].split())
        assert f"{name} {first}" in shown, name
    assert "Usage: localmix [OPTIONS] COMMAND [ARGS]..." in shown and "--version" in shown


def test_the_group_size_default_is_the_converters():
    from localmix.quant.manifest import Settings

    from localmix.defaults import DEFAULT_GROUP_SIZE

    assert Settings().group_size == DEFAULT_GROUP_SIZE


def test_pull_help_shows_the_revision_syntax():
    r = CliRunner().invoke(app, ["pull", "--help"])
    assert r.exit_code == 0 and "org/name[@revision]" in r.stdout


def test_chat_has_line_editing_and_a_history_across_sessions(tmp_path):
    """The up arrow brings back the last line typed, in this session and the next."""

    def start():
        child = spawn_chat("demo", env={"LOCALMIX_HOME": str(tmp_path)})
        child.expect(PROMPT)
        return child

    child = start()
    child.sendline("/set max_tokens 3")
    child.expect("max_tokens = 3")
    child.expect(">>> ")
    child.send("\x1b[A")  # up arrow: the line comes back, editable
    child.send("1\r")  # ...and edited: max_tokens 31
    child.expect("max_tokens = 31")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    assert "/set max_tokens 31" in (tmp_path / "history").read_text()
    child = start()
    child.send("\x1b[A\x1b[A\r")  # the line before the previous session's /bye
    child.expect("max_tokens = 31")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


def test_list_shows_the_built_in_model(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    r = invoke("list")
    assert r.exit_code == 0 and "demo" in r.stdout and "built in" in r.stdout
    assert "no models in" in r.stderr


def test_a_context_beyond_the_models_window_is_said():
    r = invoke("run", "demo", "x", "--raw", "--max-tokens", "1", "--context", "100000")
    assert r.exit_code == 0, r.output
    assert "attends to at most 128 tokens" in r.stderr and "not 100000" in r.stderr


def test_a_finished_quantization_keeps_no_progress_file(tmp_path, tiny_mixtral, monkeypatch):
    """The rerun of a finished conversion still skips the work, from the manifest alone."""
    import localmix.quant.convert as conv

    src, _ = tiny_mixtral
    dst = tmp_path / "q"
    r = invoke("quantize", str(src), str(dst), "--method", "rtn")
    assert r.exit_code == 0, r.output
    assert not (dst / ".localmix-progress.json").exists() and (dst / "localmix.json").exists()
    shards = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.safetensors")}

    def no_work(*a, **k):
        raise AssertionError("a finished model was quantized again")

    monkeypatch.setattr(conv, "quantize_tensor", no_work)
    r = invoke("quantize", str(src), str(dst), "--method", "rtn")
    assert r.exit_code == 0, r.output
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("*.safetensors")} == shards
    assert not (dst / ".localmix-progress.json").exists()


@pytest.fixture(scope="module")
def mixtral_tokenizer_model(tmp_path_factory):
    """A tiny random Mixtral with Mixtral's own tokenizer (32000 pieces, from mistral-common)."""
    import shutil

    import mistral_common

    from tests.helpers import save_reference, tiny_mixtral_config

    path = tmp_path_factory.mktemp("mixtral_tok")
    save_reference(path, tiny_mixtral_config(vocab_size=32000))
    data = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    shutil.copyfile(data, path / "tokenizer.model")
    return path


@pytest.mark.parametrize("raw", [True, False])
def test_json_text_is_the_detokenized_reply_on_mixtrals_tokenizer(mixtral_tokenizer_model, raw):
    """The reply's text is its ids decoded, first token included: a continuation keeps that
    token's leading space, a chat answer starts at its first word."""
    import localmix
    from localmix.tokenizer import Tokenizer

    path = mixtral_tokenizer_model
    args = ["run", str(path), "def add(a, b):\n", "--temperature", "0", "--max-tokens", "12"]
    r = invoke(*args, "--json", *(["--raw"] if raw else []))
    assert r.exit_code == 0, r.output
    reply = json.loads(r.stdout)
    tok = Tokenizer(path / "tokenizer.model")
    continues = raw or not localmix.load(path, device="cpu").template.chat_format
    expected = tok.decode_continuation if continues else tok.decode
    assert reply["token_ids"] and reply["text"] == expected(reply["token_ids"])
    assert reply["text"].startswith(" ") == raw  # this model's first token is '▁talking'
    plain = invoke(*args, *(["--raw"] if raw else []))  # what streams is the same text
    assert plain.stdout == reply["text"] + "\n"


def test_run_continues_a_conversation_and_conversations_manage_them(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    r = invoke("run", "demo", "def add(a, b):", "--max-tokens", "3", "--temperature", "0")
    assert r.exit_code == 0, r.output
    [first] = [c.name for c in list_conversations()[0]]
    r = invoke("run", "demo", "-c", "print(add(1, 2))", "--max-tokens", "3")
    assert r.exit_code == 0, r.output
    [conv], _ = list_conversations()
    assert conv.name == first and [m["role"] for m in conv.messages] == ["user", "assistant"] * 2
    assert conv.messages[2]["content"] == "print(add(1, 2))"

    r = invoke("run", "demo", "--conversation", "work", "import os", "--max-tokens", "2")
    assert r.exit_code == 0 and len(Conversation.load("work").messages) == 2
    r = invoke("run", "demo", "--conversation", "work", "import sys", "--max-tokens", "2")
    assert len(Conversation.load("work").messages) == 4
    for args, text in [
        (["--conversation", "../up"], "not a valid name"),
        (["-c", "--conversation", "work"], "not both"),
        (["-c", "--raw"], "need the chat template"),
    ]:
        r = invoke("run", "demo", *args, "x")
        assert r.exit_code == 1 and text in r.stderr, r.output

    r = invoke("conversations")
    assert r.exit_code == 0 and "work" in r.stdout and first in r.stdout
    assert r.stdout.index("work") < r.stdout.index(first)  # newest first
    r = invoke("conversations", "show", "work")
    assert r.exit_code == 0 and ">>> import os" in r.stdout and ">>> import sys" in r.stdout
    r = invoke("conversations", "rename", "work", first)
    assert r.exit_code == 1 and "already saved" in r.stderr
    assert invoke("conversations", "rename", "work", "play").exit_code == 0
    assert invoke("conversations", "rm", "play").exit_code == 0
    assert [c.name for c in list_conversations()[0]] == [first]
    r = invoke("conversations", "rm", "play")
    assert r.exit_code == 1 and "no saved conversation" in r.stderr


def test_a_long_prompt_cut_to_the_context_is_said():
    r = invoke("run", "demo", "word " * 300, "--max-tokens", "1")
    assert r.exit_code == 0, r.output
    assert "the context holds 128" in r.stderr


def test_a_resumed_pull_says_so(tmp_path, monkeypatch):
    from tests.hub_server import FakeHub, HubState, repo_from_dir

    src = tmp_path / "m"
    write_checkpoint(src, DEMO_CONFIG, demo_tokenizer_path(), seed=3, max_shard_bytes=5_000_000)
    state = HubState()
    state.repos["org/tiny"] = repo_from_dir(src)
    files = state.repos["org/tiny"].files
    big = max((n for n in files if n.endswith(".safetensors")), key=lambda n: len(files[n]))
    state.cut_after[big] = len(files[big]) // 2
    with FakeHub(state) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        assert invoke("pull", "org/tiny", "--no-quantize").exit_code == 1
        r = invoke("pull", "org/tiny", "--no-quantize")
    assert r.exit_code == 0, r.output
    assert f"{big} (resuming at" in r.stderr


@pytest.mark.parametrize(
    ("flags", "want"), [((), None), (("--mmap",), True), (("--no-mmap",), False)]
)
def test_mmap_flags_reach_the_loader(flags, want, monkeypatch):
    """`--mmap` keeps CPU weights mapped from the files, `--no-mmap` reads them into huge pages,
    neither leaves the choice to localmix.load."""
    import localmix

    seen = {}
    real = localmix.load

    def load(*args, **options):
        seen.update(options)
        return real(*args, **options)

    monkeypatch.setattr(localmix, "load", load)
    r = invoke("run", "demo", "hi", "--max-tokens", "1", "--device", "cpu", *flags)
    assert r.exit_code == 0, r.output
    assert seen["mmap"] is want
