"""`localmix serve`: the real server on 127.0.0.1 (a port the system picks) with the built-in
model, driven by the official `openai` package and by the `llm` command line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from localmix.demo import DEMO_CONFIG, demo_tokenizer_path, write_checkpoint
from tests.chat_pty import PROMPT, leave, say, spawn_chat, stop_a_reply

SERVING = re.compile(r"serving on (http://\S+)/v1 ")


class Server:
    """`localmix serve ARGS --port 0` in its own process, until `stop`."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        env = {**os.environ, "LOCALMIX_HOME": str(home)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "localmix.cli", "serve", *args, "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log: list[str] = []
        for line in self.proc.stderr:
            self.log.append(line)
            if found := SERVING.search(line):
                self.url = found.group(1)
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(self.log))
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def localmix(self, *args: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """The command line, with this server at $LOCALMIX_HOST."""
        env = {**os.environ, "LOCALMIX_HOME": str(self.home), "LOCALMIX_HOST": self.url}
        return subprocess.run(
            [sys.executable, *python, "-m", "localmix.cli", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    def rss(self) -> int:
        """The server's resident memory, in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> None:
        """Ctrl+C: the server ends as every command does, with one line and status 130."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=30) == 130
        self.drain.join(timeout=10)
        log = "".join(self.log)
        assert "Traceback" not in log and log.splitlines()[-1] == "interrupted", log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo model, loaded at start; at most 4 requests wait."""
    s = Server(tmp_path_factory.mktemp("home"), "demo", "--max-queue", "4")
    yield s
    s.stop()


def chat(client: openai.OpenAI, text: str, **options):
    messages = [{"role": "user", "content": text}]
    return client.chat.completions.create(model="demo", messages=messages, **options)


def test_chat_and_completions_whole_and_streamed(server):
    client = server.client()
    reply = chat(client, "def f(x):", max_tokens=8, seed=1)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        chat(
            client,
            "def f(x):",
            max_tokens=8,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # same seed, same reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    done = client.completions.create(model="demo", prompt="import os\n", max_tokens=6, seed=2)
    assert done.choices[0].text and done.choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(
        model="demo", prompt="import os\n", max_tokens=6, seed=2, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_a_stop_sequence_ends_the_reply_before_it(server):
    client = server.client()
    prompt = "def parse(path):\n"
    full = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model="demo", prompt=prompt, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", temperature=-1)
    assert e.value.body["param"] == "temperature" and "temperature" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # nano attends to 128 tokens
        client.completions.create(model="demo", prompt="x = 1\n" * 200, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        chat(client, "hi", n=2)
    status, body = server.post("/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = server.post("/v1/completions", json.dumps({"model": "demo"}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    assert chat(client, "still serving", max_tokens=2).choices[0].message.content is not None


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    client = server.client()
    before = server.get("/health")["queue"]["cancelled"]
    stream = chat(client, "def f(x):", max_tokens=100_000, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # 100,000 tokens would take minutes: this answers only once the worker has let them go
    assert chat(client, "def g(y):", max_tokens=2).choices[0].finish_reason
    assert server.get("/health")["queue"]["cancelled"] == before + 1


def test_a_base_model_continues_the_conversation_and_says_so(server):
    client = server.client()
    listed = {m.id: m for m in client.models.list().data}
    info = listed["demo"].model_extra["localmix"]
    assert info["loaded"] and info["chat_template"] is False and "continues" in info["note"]
    text = "def fibonacci(n):\n"
    replied = chat(client, text, max_tokens=12, temperature=0).choices[0].message.content
    continued = client.completions.create(model="demo", prompt=text, max_tokens=12, temperature=0)
    assert replied == continued.choices[0].text


def test_the_next_turn_prefills_only_its_new_tokens(server):
    client = server.client()
    turns = [{"role": "user", "content": "import os\n"}]
    first = client.chat.completions.create(
        model="demo", messages=turns, max_tokens=8, temperature=0
    )
    turns += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "\nimport sys\n"},
    ]
    second = client.chat.completions.create(
        model="demo", messages=turns, max_tokens=4, temperature=0
    )
    figures = second.model_extra["localmix"]
    assert figures["prefilled_tokens"] < figures["prompt_tokens"] - first.usage.completion_tokens


def test_health_says_what_is_loaded(server):
    health = server.get("/health")
    model = health["model"]
    assert health["status"] == "ok" and model["name"] == "demo"
    assert model["context"] == 128 and model["device"] == "cpu" and "cache" in model
    assert health["queue"]["max_queue"] == 4


def test_llm_cli_as_an_openai_compatible_model(server, tmp_path):
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: localmix-demo\n  model_name: demo\n  api_base: {server.url}/v1\n"
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm",
            "-m",
            "localmix-demo",
            "def f(x):",
            "-o",
            "max_tokens",
            "6",
            "-o",
            "seed",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_sixteen_clients_get_answers_or_a_clean_overloaded(server):
    """16 clients x 4 requests against a queue of 4: each request is answered whole, or refused
    with 503 "overloaded"; the server's memory is the same afterwards."""
    client = server.client()

    def one(i: int) -> str:
        try:
            if i % 2:
                chunks = list(chat(client, "def f(x):", max_tokens=3, stream=True))
                assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            else:
                reply = chat(client, "def f(x):", max_tokens=3)
                assert reply.choices[0].finish_reason in ("stop", "length")
                assert reply.usage.completion_tokens <= 3
            return "answered"
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.body["code"] == "overloaded", e.body
            return "overloaded"

    def client_run(c: int) -> list[str]:
        return [one(c * 4 + r) for r in range(4)]

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client_run, range(16)))  # warms the allocator up
        before = server.rss()
        outcomes = [o for run in pool.map(client_run, range(16)) for o in run]
    after = server.rss()
    assert len(outcomes) == 64 and "answered" in outcomes
    assert after - before < 16 * 2**20, (before, after)
    assert server.get("/health")["queue"]["waiting"] == 0


def test_run_answers_through_the_server_without_pytorch(server):
    args = ("run", "demo", "def f(x):", "--max-tokens", "6", "--temperature", "0", "--json")
    through = server.localmix(*args, python=("-X", "importtime"))
    assert through.returncode == 0, through.stderr
    assert not {"torch", "localmix.engine"} & {
        line.split("|")[-1].strip() for line in through.stderr.splitlines()
    }
    here = server.localmix(*args, "--no-server")
    assert here.returncode == 0, here.stderr
    assert json.loads(through.stdout)["token_ids"] == json.loads(here.stdout)["token_ids"]
    lone = server.localmix("run", "def f(x):", "--max-tokens", "2")  # the server's model
    assert lone.returncode == 0 and lone.stdout.strip(), lone.stderr
    refused = server.localmix("run", "demo", "x", "--top-p", "2")
    assert refused.returncode == 1 and "top_p" in refused.stderr


def test_a_chat_session_through_the_server(server, monkeypatch):
    from localmix.cli.client import RemoteEngine, find_server

    from localmix.session import ChatSession

    monkeypatch.setenv("LOCALMIX_HOST", server.url)
    found = find_server()
    assert found is not None
    session = ChatSession(RemoteEngine(found, "demo", {"max_tokens": 4, "temperature": 0}))
    first = session.reply("import os\n")
    second = session.reply("import sys\n")
    assert first.generated_tokens == 4 and session.messages[-1]["content"] == second.text
    assert second.prefilled_tokens < second.prompt_tokens - first.generated_tokens


def test_chat_in_a_terminal_through_the_server(server):
    """The REPL as a user types it, its replies from the server: Ctrl+C stops one there."""
    env = {**os.environ, "LOCALMIX_HOME": str(server.home), "LOCALMIX_HOST": server.url}
    child = spawn_chat("demo", "--max-tokens", "100000", env=env, python=("-X", "importtime"))
    child.expect(PROMPT)
    imports = child.before  # -X importtime's lines
    assert re.search(r"\|\s+localmix\.session\r", imports)
    assert not re.search(r"\|\s+torch\r", imports)
    before = server.get("/health")["queue"]["cancelled"]
    stop_a_reply(child, "write forever", "reply stopped")
    say(child, "/set max_tokens 3")
    say(child, "and another")
    leave(child)
    assert server.get("/health")["queue"]["cancelled"] == before + 1


def test_run_and_chat_load_the_model_themselves_when_told_how(server, monkeypatch):
    from localmix.cli.client import connect

    monkeypatch.setenv("LOCALMIX_HOST", server.url)
    assert connect({"model", "temperature", "stop"}, no_server=False) is not None
    assert connect({"model", "context"}, no_server=False) is None  # a load option: here
    assert connect(set(), no_server=True) is None
    monkeypatch.setenv("LOCALMIX_HOST", "127.0.0.1:9")  # nothing listens there
    assert connect(set(), no_server=False) is None


@pytest.fixture(scope="module")
def swapping(tmp_path_factory):
    """No model at start, a second model in the store, idle models unloaded at once, a key."""
    home = tmp_path_factory.mktemp("home")
    write_checkpoint(home / "models" / "other", DEMO_CONFIG, demo_tokenizer_path(), seed=7)
    s = Server(home, "--keep-alive", "0", "--api-key", "secret")
    yield s
    s.stop()


def test_models_load_on_first_use_swap_and_unload(swapping):
    assert swapping.get("/health")["model"] is None
    client = swapping.client("secret")
    assert {m.id for m in client.models.list().data} == {"demo", "other"}
    for name in ("demo", "other"):
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.model == name
    other = client.models.retrieve("other").model_extra["localmix"]
    assert other["chat_template"] is True  # no tokenizer_config.json: Mixtral-Instruct's
    for _ in range(100):  # keep-alive 0: unloaded once the worker is done with it
        if swapping.get("/health")["model"] is None:
            break
    assert swapping.get("/health")["model"] is None


def test_a_wrong_key_is_refused(swapping):
    with pytest.raises(openai.AuthenticationError):
        swapping.client("wrong").models.list()


def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path):
    env = {**os.environ, "LOCALMIX_HOME": str(tmp_path)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, message in [
            (("--port", port), "cannot listen on 127.0.0.1:" + port),
            (("no-such-model", "--port", "0"), "no model 'no-such-model'"),
            (("--keep-alive", "soon"), "--keep-alive must be a duration"),
        ]:
            r = subprocess.run(
                [sys.executable, "-m", "localmix.cli", "serve", *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
            )
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert message in r.stderr


def test_a_failing_request_does_not_stop_the_worker():
    """A bug inside one request is that request's 500; the next one is served."""
    from localmix.serve.protocol import APIError, Request
    from localmix.serve.worker import END, Job, Residency, Worker

    class Engine:
        name, context, calls = "fake", 100, 0

        def prompt_ids(self, prompt):
            return [1, 2]

        def generate(self, ids, **sampling):
            Engine.calls += 1
            if Engine.calls == 1:
                raise RuntimeError("boom")
            yield "reply"

    async def run() -> list[list[object]]:
        worker = Worker(Residency(lambda name: Engine(), None), max_queue=2)
        worker.start()
        loop = asyncio.get_running_loop()
        jobs = [
            Job(Request("completion", "fake", prompt="x"), "fake", Path("."), loop) for _ in "ab"
        ]
        out = []
        for job in jobs:
            worker.submit(job)
            items = []
            while (item := await job.stream.get()) is not END:
                items.append(item)
            out.append(items)
        await asyncio.to_thread(worker.stop)
        return out

    failed, served = asyncio.run(run())
    assert (
        isinstance(failed[0], APIError) and failed[0].status == 500 and "boom" in failed[0].message
    )
    assert served == ["reply"]
