"""`localmix pull` against a local stand-in for the Hub: the real huggingface-hub client runs."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from localmix.cli.main import app
from typer.testing import CliRunner

import localmix
from localmix.demo import DEMO_CONFIG, demo_tokenizer_path, write_checkpoint
from tests.hub_server import FakeHub, HubState, Repo, etag, repo_from_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hubmodel") / "m"
    write_checkpoint(path, DEMO_CONFIG, demo_tokenizer_path(), seed=3, max_shard_bytes=5_000_000)
    (path / "pytorch_model.bin").write_bytes(b"pickle that must never be fetched")
    (path / "README.md").write_text("# tiny\n")
    (path / "tokenizer_config.json").write_text('{"add_bos_token": true}')  # a base model's
    return path


@pytest.fixture
def hub(model_files, tmp_path, monkeypatch):
    state = HubState()
    state.repos["org/tiny"] = repo_from_dir(model_files)
    state.repos["org/gated"] = Repo({}, status=401)
    with FakeHub(state) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield server


def blob_for(tmp_path: Path, data: bytes) -> Path:
    return tmp_path / "hf" / "models--org--tiny" / "blobs" / etag(data)


def test_pull_then_run(hub, tmp_path):
    r = runner.invoke(app, ["pull", "org/tiny", "--method", "rtn"])
    assert r.exit_code == 0, r.output
    files = hub.state.repos["org/tiny"].files
    snapshot = (
        tmp_path / "hf" / "models--org--tiny" / "snapshots" / hub.state.repos["org/tiny"].commit
    )
    got = sorted(p.name for p in snapshot.iterdir())
    assert "pytorch_model.bin" not in got and "README.md" not in got
    assert "tokenizer.model" in got and "model.safetensors.index.json" in got
    assert "tokenizer_config.json" in got  # it says whether the model is a chat model
    for name in got:
        assert (snapshot / name).read_bytes() == files[name]
    fetched = [p for m, p, _ in hub.state.requests if m == "GET" and "/resolve/" in p]
    assert not any(p.endswith(".bin") for p in fetched)
    r = runner.invoke(app, ["list"])
    assert "org/tiny" in r.stdout and "q4 g64 (rtn)" in r.stdout
    # the quantized copy keeps the file, so the base model is continued, not given [INST]
    assert not localmix.load("org/tiny", device="cpu").template.chat_format
    r = runner.invoke(app, ["run", "org/tiny", "hello", "--max-tokens", "4"])
    assert r.exit_code == 0, r.output
    # a second pull downloads nothing again
    before = len(hub.state.requests)
    r = runner.invoke(app, ["pull", "org/tiny", "--method", "rtn"])
    assert r.exit_code == 0
    assert not [p for m, p, _ in hub.state.requests[before:] if m == "GET" and "/resolve/" in p]
    # rm deletes the quantized model and says where the original download still is
    r = runner.invoke(app, ["rm", "org/tiny"])
    assert r.exit_code == 0 and "still in the Hugging Face cache" in r.stderr, r.output
    assert "models--org--tiny" in r.stderr and snapshot.is_dir()


def test_interrupted_pull_resumes_with_range(hub, tmp_path):
    files = hub.state.repos["org/tiny"].files
    big = max((n for n in files if n.endswith(".safetensors")), key=lambda n: len(files[n]))
    half = len(files[big]) // 2
    hub.state.cut_after[big] = half
    r = runner.invoke(app, ["pull", "org/tiny", "--no-quantize"])
    assert r.exit_code == 1 and "pull again" in r.stderr, r.output
    partial = blob_for(tmp_path, files[big]).with_name(etag(files[big]) + ".incomplete")
    kept = partial.stat().st_size
    assert half - 2**16 <= kept <= half  # what arrived before the hang-up, in whole chunks
    r = runner.invoke(app, ["pull", "org/tiny", "--no-quantize"])
    assert r.exit_code == 0, r.output
    assert "16-bit" not in r.stderr and "not quantized" in r.stderr  # its dtype, as published
    ranged = [
        h for m, p, h in hub.state.requests if m == "GET" and p.endswith(big) and "Range" in h
    ]
    assert ranged and ranged[0]["Range"] == f"bytes={kept}-"
    assert blob_for(tmp_path, files[big]).read_bytes() == files[big]
    assert not partial.exists()
    r = runner.invoke(app, ["run", "org/tiny", "x", "--max-tokens", "2"])
    assert r.exit_code == 0, r.output


def test_gated_missing_and_unreachable(hub, monkeypatch):
    r = runner.invoke(app, ["pull", "org/gated"])
    assert r.exit_code == 1 and "HF_TOKEN" in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["pull", "org/nothing"])
    assert r.exit_code == 1 and "no repository org/nothing" in r.stderr
    r = runner.invoke(app, ["pull", "not-a-repo-id"])
    assert r.exit_code == 1 and "org/name" in r.stderr
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    r = runner.invoke(app, ["pull", "org/tiny"])
    assert r.exit_code == 1 and "cannot reach the Hub" in r.stderr


def test_disk_space_is_checked_before_writing(hub, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    r = runner.invoke(app, ["pull", "org/tiny"])
    assert r.exit_code == 1 and "not enough disk space" in r.stderr
    assert not (tmp_path / "hf" / "models--org--tiny" / "blobs").exists()


def outside(tmp_path: Path) -> dict[str, bytes]:
    """Every file under tmp_path but the Hub cache and the store: what a pull must not touch."""
    return {
        str(p.relative_to(tmp_path)): p.read_bytes() if p.is_file() else b"dir"
        for p in sorted(tmp_path.rglob("*"))
        if p.relative_to(tmp_path).parts[0] not in ("hf", "home")
    }


def one_line_error(r, text: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], r.stderr


@pytest.fixture
def victim(tmp_path) -> Path:
    """A user's files beside the cache, which a hostile Hub aims at."""
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "config.json").write_text('{"mine": true}')
    return tmp_path / "user"


@pytest.mark.parametrize(
    "commit",
    ["../../../user", "0123456789abcdef0123456789abcdef0123456z", "..", "", "a" * 39],
)
def test_a_commit_id_from_the_hub_is_checked(hub, tmp_path, victim, commit):
    hub.state.repos["org/tiny"].commit = commit
    before = outside(tmp_path)
    one_line_error(runner.invoke(app, ["pull", "org/tiny"]), "not a commit id")
    assert outside(tmp_path) == before
    assert not (tmp_path / "hf" / "models--org--tiny").exists()


@pytest.mark.parametrize("etag_value", ["../../../../user/config.json", "..", "x" * 64, "ab/cd"])
def test_an_etag_from_the_hub_is_checked(hub, tmp_path, victim, etag_value):
    hub.state.etags["config.json"] = etag_value
    before = outside(tmp_path)
    one_line_error(runner.invoke(app, ["pull", "org/tiny"]), "not a hex digest")
    assert outside(tmp_path) == before
    blobs = tmp_path / "hf" / "models--org--tiny" / "blobs"
    assert all(len(p.name.split(".")[0]) in (40, 64) for p in blobs.glob("*"))


def test_hostile_file_names_are_never_fetched(hub, tmp_path, victim):
    files = hub.state.repos["org/tiny"].files
    for name in ("../../user/config.json", "..", "/abs.safetensors", "a\\b.safetensors", "x/.."):
        files[name] = b"hostile"
    before = outside(tmp_path)
    r = runner.invoke(app, ["pull", "org/tiny", "--no-quantize"])
    assert r.exit_code == 0, r.output
    assert outside(tmp_path) == before
    fetched = [p for m, p, _ in hub.state.requests if "/resolve/" in p]
    assert not any("abs" in p or "user" in p or "%5C" in p or "\\" in p for p in fetched)


@pytest.mark.parametrize("size", [-5, "12", 10**15])
def test_a_listed_size_is_checked(hub, tmp_path, size):
    hub.state.sizes["config.json"] = size
    r = runner.invoke(app, ["pull", "org/tiny", "--no-quantize"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "hf" / "models--org--tiny" / "snapshots").exists() or size == 10**15


def test_a_revision_is_checked(hub, tmp_path, victim):
    before = outside(tmp_path)
    for ref in ("org/tiny@..", "org/tiny@.", "../tiny", "org/..", "org/a--b", "org/tiny@a\\b"):
        r = runner.invoke(app, ["pull", ref])
        assert r.exit_code == 1 and "Traceback" not in r.output, (ref, r.output)
    assert outside(tmp_path) == before


def test_a_hostile_index_is_refused_after_download(hub, tmp_path, victim):
    files = hub.state.repos["org/tiny"].files
    index = json.loads(files["model.safetensors.index.json"])
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../../../user/stolen.safetensors"
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    one_line_error(runner.invoke(app, ["pull", "org/tiny", "--method", "rtn"]), "refusing")
    assert not (tmp_path / "home" / "models" / "org--tiny" / "localmix.json").exists()


def test_two_pulls_of_one_repository_at_once(hub, tmp_path):
    from localmix import hub as hub_client

    hub.state.slow = 0.01  # each file takes a while: the pulls overlap
    results: dict[int, object] = {}

    def pull(i: int) -> None:
        try:
            results[i] = hub_client.pull("org/tiny", tmp_path / "store", quantize=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results[0] == results[1] and isinstance(results[0], Path), results
    files = hub.state.repos["org/tiny"].files
    for name, data in files.items():
        if hub_client.wanted(name):
            assert (results[0] / name).read_bytes() == data
    gets = [p for m, p, _ in hub.state.requests if m == "GET" and "/resolve/" in p]
    assert len(gets) == len(set(gets))  # the second pull found the first's files
