"""Hostile files (issue #12): the store, checkpoints, configs, tokenizers and manifests that
arrive broken or crafted. Each is refused with one line and exit 1 (or works), nothing outside
the command's target is touched, and nothing finished is lost."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from localmix.cli.main import app
from localmix.quant.convert import ConvertError, Settings, convert
from localmix.quant.safetensors_io import INDEX, SafetensorsError, write_file, write_index
from typer.testing import CliRunner

import localmix
from localmix import store
from localmix.demo import demo_tokenizer_path, mixtral_config, write_checkpoint
from localmix.errors import (
    CheckpointError,
    ConfigError,
    LocalmixError,
    ModelNotFoundError,
    TokenizerError,
)
from localmix.loader import open_file, read_manifest

runner = CliRunner()

TINY = mixtral_config(
    hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, experts=2, top_k=1, window=None
)


def invoke(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(r, text: str = "") -> None:
    """Exit 1, and the error is one line, stderr's last, without a traceback (a progress bar
    may stand before it)."""
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and text in errors[0], r.stderr


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file and link under `root`: its bytes, or where a link points."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny bf16 Mixtral in the Hugging Face layout, sharded with an index."""
    path = tmp_path_factory.mktemp("tiny") / "m"
    write_checkpoint(path, TINY, demo_tokenizer_path(), seed=0, max_shard_bytes=150_000)
    return path


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A fresh copy of the tiny model, for a test to damage."""
    dst = tmp_path / "m"
    shutil.copytree(tiny, dst)
    return dst


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("tinyq") / "q"
    convert(tiny, dst, Settings(group_size=32, method="rtn"))
    return dst


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def rewrite_header(path: Path, header: object, raw: bytes | None = None) -> None:
    """Give a safetensors file another header (JSON `header`, or the bytes `raw`), data kept."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    blob = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def header_of(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


# -- 1: the store -----------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LOCALMIX_HOME", str(home))
    (home / "models" / "org--a").mkdir(parents=True)
    (home / "models" / "org--a" / "config.json").write_text("{}")
    (home / "models" / "b").mkdir()
    (home / "models" / "b" / "config.json").write_text("{}")
    (home / "conversations").mkdir()
    (home / "conversations" / "chat.json").write_text("{}")
    (home / "notes.txt").write_text("mine")
    return home


@pytest.mark.parametrize(
    "name", ["..", ".", "", "../models", "org/../..", "/", "/etc", "a\\b", ".hidden", "x/y/z"]
)
def test_rm_refuses_names_that_are_not_one_store_entry(home, name):
    before = tree(home.parent)
    one_line_error(invoke("rm", name))
    assert tree(home.parent) == before
    with pytest.raises(ModelNotFoundError):
        store.remove(name)


def test_rm_removes_exactly_the_entry(home):
    before = tree(home)
    r = invoke("rm", "org/a")
    assert r.exit_code == 0, r.output
    assert tree(home) == {k: v for k, v in before.items() if not k.startswith("models/org--a")}
    one_line_error(invoke("rm", "org/a"), "no model 'org/a'")


def test_rm_of_a_linked_entry_removes_the_link(home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "weights").write_text("keep")
    (home / "models" / "linked").symlink_to(elsewhere, target_is_directory=True)
    assert invoke("rm", "linked").exit_code == 0
    assert not (home / "models" / "linked").exists()
    assert (elsewhere / "weights").read_text() == "keep"


def test_store_entry_is_directly_inside_the_store(home):
    assert store.entry("org/a") == home / "models" / "org--a"
    assert store.entry("b") == home / "models" / "b"
    for name in ("..", "", ".", "a/b/c", "..\\x", ".tmp-1"):
        with pytest.raises(ModelNotFoundError):
            store.entry(name)


def test_resolve_refuses_names_it_cannot_look_up(home):
    for name in ("", "~nobody-here/x", "a\x00b", "org/../../x"):
        with pytest.raises(ModelNotFoundError):
            store.resolve(name)


# -- 3: shard names in the index --------------------------------------------------------------


def set_index_shard(model: Path, shard: str) -> None:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["parent", "absolute", "subdir", "not-safetensors"])
def test_index_shard_names_stay_in_the_model_directory(model, tmp_path, kind):
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(shards(model)[0], outside)
    (model / "sub").mkdir()
    shutil.copyfile(shards(model)[0], model / "sub" / "x.safetensors")
    name = {
        "parent": "../outside.safetensors",
        "absolute": str(outside),
        "subdir": "sub/x.safetensors",
        "not-safetensors": "config.json",
    }[kind]
    set_index_shard(model, name)
    with pytest.raises(CheckpointError, match="refusing to read it"):
        localmix.load(model, device="cpu")
    one_line_error(invoke("show", str(model)), "refusing to read it")
    one_line_error(invoke("quantize", str(model), str(tmp_path / "q")), "refusing to read it")
    assert not (tmp_path / "q").exists()


def test_hugging_face_cache_layout_with_linked_files_loads_and_quantizes(tiny, tmp_path):
    """Snapshot files are links into ../../blobs: that stays fine."""
    blobs, snapshot = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny.iterdir())):
        shutil.copyfile(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert localmix.load(snapshot, device="cpu").complete("x", max_tokens=2).generated_tokens
    r = invoke("quantize", str(snapshot), str(tmp_path / "q"), "--method", "rtn")
    assert r.exit_code == 0, r.output


# -- 4: the fingerprint covers content --------------------------------------------------------


def rewrite_weights(model: Path, seed: int) -> None:
    """Other weights of the same shapes, in the same files (a fine-tune written in place)."""
    other = model.parent / f"other{seed}"
    write_checkpoint(other, TINY, demo_tokenizer_path(), seed=seed, max_shard_bytes=150_000)
    for f in shards(other):
        assert f.stat().st_size == (model / f.name).stat().st_size
        shutil.copyfile(f, model / f.name)
    shutil.rmtree(other)


def test_changed_weights_of_the_same_sizes_are_quantized_again(model, tmp_path):
    settings = Settings(group_size=32, method="rtn")
    convert(model, tmp_path / "q", settings)
    old = tree(tmp_path / "q")
    rewrite_weights(model, seed=7)
    r = invoke("quantize", str(model), str(tmp_path / "q"), "--method", "rtn", "--group-size", "32")
    assert r.exit_code == 0, r.output
    convert(model, tmp_path / "clean", settings)
    new, clean = tree(tmp_path / "q"), tree(tmp_path / "clean")
    weights = [k for k in clean if k.endswith(".safetensors")]
    assert all(new[k] == clean[k] for k in weights)
    assert any(new[k] != old[k] for k in weights)
    recorded = read_manifest(tmp_path / "q")["source"]["files"]
    assert recorded == json.loads(clean["localmix.json"])["source"]["files"]


def test_a_resume_does_not_mix_shards_of_two_sources(model, tmp_path, monkeypatch):
    import localmix.quant.convert as conv

    settings = Settings(group_size=32, method="rtn")
    real = conv.write_file
    calls = {"n": 0}

    def crash_on_second_shard(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "write_file", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert(model, tmp_path / "q", settings)
    monkeypatch.setattr(conv, "write_file", real)
    rewrite_weights(model, seed=9)  # the first shard, already converted, changes under it
    progress: list[str] = []
    convert(model, tmp_path / "q", settings, progress=lambda d, t, w: progress.append(w))
    assert not any("already done" in w for w in progress)
    convert(model, tmp_path / "clean", settings)
    q, clean = tree(tmp_path / "q"), tree(tmp_path / "clean")
    assert all(q[k] == clean[k] for k in clean if k.endswith(".safetensors"))


def test_unchanged_source_is_not_quantized_again(model, tmp_path):
    settings = Settings(group_size=32, method="rtn")
    convert(model, tmp_path / "q", settings)
    before = tree(tmp_path / "q")
    for f in shards(model):  # same bytes, new file identity
        f.write_bytes(f.read_bytes())
    convert(model, tmp_path / "q", settings)
    assert tree(tmp_path / "q") == before  # the manifest too: nothing was redone


# -- 9: NaN and Inf in weights ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor,value",
    [
        ("model.layers.1.block_sparse_moe.experts.0.w2.weight", float("nan")),
        ("model.layers.0.input_layernorm.weight", float("inf")),
    ],
)
def test_non_finite_weights_are_refused_at_quantize(model, tmp_path, tensor, value):
    from localmix.quant.safetensors_io import SafetensorsFile, write_file

    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    path = model / index[tensor]
    f = SafetensorsFile(path)
    tensors = {n: f.get(n).clone() for n in f.keys()}
    tensors[tensor].view(-1)[3] = value
    write_file(path, tensors, f.metadata)
    r = invoke("quantize", str(model), str(tmp_path / "q"), "--method", "rtn")
    one_line_error(r, f"tensor '{tensor}' holds NaN or infinite values")
    assert not (tmp_path / "q" / "localmix.json").exists()


# -- 10: config and checkpoint disagree -------------------------------------------------------


def set_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_hidden_layers": 1}, "asks for 1 layers, the checkpoint holds 2"),
        ({"num_hidden_layers": 3}, "asks for 3 layers, the checkpoint holds 2"),
        ({"num_hidden_layers": 10**9}, "asks for 1000000000 layers"),
        ({"num_local_experts": 1}, "asks for 1 experts per layer"),
        ({"hidden_size": 2**40, "head_dim": 16}, "(vocab_size, hidden_size)"),
        ({"vocab_size": 10**12}, "(vocab_size, hidden_size)"),
        ({"intermediate_size": 10**12}, "has shape"),
    ],
)
def test_config_sizes_are_checked_against_the_files_first(model, changes, message):
    set_config(model, **changes)
    start = time.monotonic()
    with pytest.raises(LocalmixError):
        localmix.load(model, device="cpu")
    if "has shape" not in message:  # show reads no tensor
        one_line_error(invoke("show", str(model)), message)
    one_line_error(invoke("run", str(model), "hi", "--max-tokens", "1"))
    assert time.monotonic() - start < 20  # nothing of the config's size was built


def test_quantize_refuses_a_source_its_config_does_not_describe(model, tmp_path):
    set_config(model, num_hidden_layers=3)
    one_line_error(invoke("quantize", str(model), str(tmp_path / "q")), "asks for 3 layers")
    (model / "config.json").write_bytes(b'{"model_type": "\xff"}')
    one_line_error(invoke("quantize", str(model), str(tmp_path / "q")), "not UTF-8")
    assert not (tmp_path / "q").exists()


def test_unused_tensors_are_an_error(model):
    from localmix.quant.safetensors_io import SafetensorsFile, write_file

    path = shards(model)[-1]
    f = SafetensorsFile(path)
    tensors = {n: f.get(n).clone() for n in f.keys()}
    tensors["model.layers.0.extra.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    write_file(path, tensors, f.metadata)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = path.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not use .*model.layers.0.extra.weight"):
        localmix.load(model, device="cpu")


# -- 13: two conversions into one destination at once ---------------------------------------


def test_two_conversions_into_one_destination_take_turns(tiny, tmp_path):
    dst, settings = tmp_path / "q", Settings(group_size=32, method="rtn")
    first_running, second_waiting = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def first_progress(done, total, what):
        first_running.set()
        second_waiting.wait(20)  # hold the destination until the second run waits for it

    def second_progress(done, total, what):
        if what.startswith("waiting for another conversion"):
            second_waiting.set()

    def run(name, progress):
        try:
            results[name] = convert(tiny, dst, settings, progress=progress)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[name] = e

    a = threading.Thread(target=run, args=("a", first_progress))
    a.start()
    assert first_running.wait(30)
    b = threading.Thread(target=run, args=("b", second_progress))
    b.start()
    a.join(60)
    b.join(60)
    assert second_waiting.is_set()
    assert isinstance(results["a"], dict) and isinstance(results["b"], dict), results
    assert results["a"]["shards"] == results["b"]["shards"]
    assert not (dst / ".localmix.lock").exists()
    assert localmix.load(dst, device="cpu").complete("x", max_tokens=2).generated_tokens == 2


# -- 14: safetensors headers ------------------------------------------------------------------

HEADERS = {
    "a list": lambda h: [1, 2],
    "a string": lambda h: "model",
    "an entry that is a list": lambda h: {**h, next(iter(h)): [1]},
    "float offsets": lambda h: {
        k: {**v, "data_offsets": [float(x) for x in v["data_offsets"]]} for k, v in h.items()
    },
    "negative offsets": lambda h: {
        k: {**v, "data_offsets": [-8, v["data_offsets"][1] - v["data_offsets"][0] - 8]}
        for k, v in h.items()
    },
    "huge offsets": lambda h: {
        k: {**v, "data_offsets": [2**70, 2**70 + v["data_offsets"][1] - v["data_offsets"][0]]}
        for k, v in h.items()
    },
    "a dtype that does not match the data": lambda h: {
        k: {**v, "dtype": "F32"} for k, v in h.items()
    },
    "an unknown dtype": lambda h: {k: {**v, "dtype": "Q4"} for k, v in h.items()},
    "a negative shape": lambda h: {k: {**v, "shape": [-1, *v["shape"][1:]]} for k, v in h.items()},
    "boolean shape": lambda h: {k: {**v, "shape": [True] * len(v["shape"])} for k, v in h.items()},
    "overlapping tensors": lambda h: {
        k: {**v, "data_offsets": [0, v["data_offsets"][1] - v["data_offsets"][0]]}
        for k, v in h.items()
    },
    "metadata that is not an object": lambda h: {**h, "__metadata__": [1]},
}


@pytest.mark.parametrize("kind", list(HEADERS))
def test_malformed_safetensors_headers(model, kind):
    path = shards(model)[0]
    header = header_of(path)
    metadata = header.pop("__metadata__")
    mutated = HEADERS[kind](header)
    if isinstance(mutated, dict) and "__metadata__" not in mutated:
        mutated["__metadata__"] = metadata
    rewrite_header(path, mutated)
    with pytest.raises(CheckpointError, match=path.name):
        open_file(path)
    one_line_error(invoke("run", str(model), "hi", "--max-tokens", "1"), path.name)


def test_deeply_nested_header(model):
    path = shards(model)[0]
    rewrite_header(path, None, raw=b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(CheckpointError, match="nested too deep"):
        open_file(path)
    one_line_error(invoke("show", str(model)), "nested too deep")


# -- 14: config.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_key_value_heads": 0}, "num_key_value_heads"),
        ({"hidden_size": -64}, "hidden_size"),
        ({"intermediate_size": "256"}, "intermediate_size"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers"),
        ({"vocab_size": True}, "vocab_size"),
        ({"rope_theta": 0}, "rope_theta"),
        ({"rope_theta": -1e4}, "rope_theta"),
        ({"rope_theta": "big"}, "rope_theta"),
        ({"rope_theta": 10**400}, "rope_theta"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"rms_norm_eps": -1}, "rms_norm_eps"),
        ({"bos_token_id": 10**6}, "bos_token_id"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
        ({"rope_parameters": [1]}, "rope_parameters"),
    ],
)
def test_bad_config_values(model, changes, field):
    set_config(model, **changes)
    with pytest.raises(ConfigError, match=f"config.json: field '{field}'"):
        localmix.load(model, device="cpu")
    one_line_error(invoke("show", str(model)), field)


def test_config_not_utf8_or_nested_too_deep(model):
    (model / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    one_line_error(invoke("show", str(model)), "not UTF-8")
    (model / "config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    one_line_error(invoke("run", str(model), "hi"), "nested too deep")


def test_non_finite_config_numbers(model):
    (model / "config.json").write_text(
        (model / "config.json").read_text().replace('"rope_theta": 1000000.0', '"rope_theta": NaN')
    )
    one_line_error(invoke("show", str(model)), "rope_theta")


# -- 14: tokenizers ---------------------------------------------------------------------------


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    cfg = dict(TINY, vocab_size=1000)
    write_checkpoint(tmp_path / "m", cfg, demo_tokenizer_path(), seed=0)
    with pytest.raises(TokenizerError, match="2000 pieces, more than the model's vocabulary"):
        localmix.load(tmp_path / "m", device="cpu")
    one_line_error(invoke("run", str(tmp_path / "m"), "hi"), "more than the model's vocabulary")


def test_tokenizer_without_bos_or_eos(model, tmp_path):
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"def f{i}(x): return x + {i}" for i in range(300)))
    spm.SentencePieceTrainer.Train(
        input=str(text),
        model_prefix=str(tmp_path / "nobos"),
        vocab_size=100,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    shutil.copyfile(tmp_path / "nobos.model", model / "tokenizer.model")
    with pytest.raises(TokenizerError, match="BOS/EOS"):
        localmix.load(model, device="cpu")


# -- 14: localmix.json ------------------------------------------------------------------------

MANIFESTS = {
    "a list": lambda m: [m],
    "a string version": lambda m: {**m, "format_version": "1"},
    "a boolean version": lambda m: {**m, "format_version": True},
    "quantization a list": lambda m: {**m, "quantization": [4]},
    "a string group size": lambda m: {
        **m,
        "quantization": {**m["quantization"], "group_size": "32"},
    },
    "group size 7": lambda m: {**m, "quantization": {**m["quantization"], "group_size": 7}},
    "an unknown method": lambda m: {**m, "quantization": {**m["quantization"], "method": "magic"}},
    "attention in 3 bits": lambda m: {**m, "quantization": {**m["quantization"], "attn": "int3"}},
    "error summary of strings": lambda m: {
        **m,
        "error_summary": {"expert_mean_relative_error": "x"},
    },
    "no quantization": lambda m: {k: v for k, v in m.items() if k != "quantization"},
    "shards with a path": lambda m: {**m, "shards": {"../x": {"size": 1, "sha256": "0" * 64}}},
    "an error past float's range": lambda m: {
        **m,
        "error_summary": {**m["error_summary"], "expert_worst_relative_error": 10**400},
    },
}


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_hostile_manifest(quantized, tmp_path, kind):
    q = tmp_path / "q"
    shutil.copytree(quantized, q)
    manifest = json.loads((q / "localmix.json").read_text())
    (q / "localmix.json").write_text(json.dumps(MANIFESTS[kind](manifest)))
    with pytest.raises(CheckpointError, match="localmix.json"):
        read_manifest(q)
    one_line_error(invoke("show", str(q)), "localmix.json")
    one_line_error(invoke("run", str(q), "hi", "--max-tokens", "1"), "localmix.json")
    assert store.model_format(q) == "unreadable (localmix.json)"


def test_manifest_gate_returns_checked_values(quantized):
    manifest = read_manifest(quantized)
    assert manifest["quantization"]["group_size"] == 32 and manifest["format_version"] >= 1
    assert manifest["error_summary"]["tensors"] > 0


def test_a_hostile_progress_file_is_redone_not_trusted(tiny, tmp_path):
    settings = Settings(group_size=32, method="rtn")
    convert(tiny, tmp_path / "clean", settings)
    q = tmp_path / "q"
    convert(tiny, q, settings)
    record = json.loads((q / "localmix.json").read_text())["resume"]  # a finished model's
    record["complete"] = False
    name = next(iter(record["shards"]))
    record["shards"] = {"../../evil.safetensors": record["shards"][name], name: "nonsense"}
    (q / ".localmix-progress.json").write_text(json.dumps(record))
    (q / "localmix.json").unlink()
    convert(tiny, q, settings)
    index = json.loads((q / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards(tmp_path / "clean")}
    assert localmix.load(q, device="cpu").complete("x", max_tokens=2).generated_tokens == 2


# -- 14: a full disk --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "victim", [".localmix-progress.json", "model.safetensors.index.json", "localmix.json"]
)
def test_disk_full_while_writing_the_records(tiny, tmp_path, monkeypatch, victim):
    real = Path.write_text

    def full(self, data, *a, **k):
        if self.name == f".{victim}.tmp":
            real(self, data[: len(data) // 2], *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    settings = Settings(group_size=32, method="rtn")
    r = invoke("quantize", str(tiny), str(tmp_path / "q"), "--method", "rtn", "--group-size", "32")
    one_line_error(r, "disk full while writing")
    assert not [p for p in (tmp_path / "q").iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "q" / "localmix.json").exists()
    monkeypatch.setattr(Path, "write_text", real)
    convert(tiny, tmp_path / "q", settings)
    assert localmix.load(tmp_path / "q", device="cpu").complete("x", max_tokens=1)


def test_stale_temporary_files_are_cleaned(tiny, tmp_path):
    q = tmp_path / "q"
    convert(tiny, q, Settings(group_size=32, method="rtn"))
    record = json.loads((q / "localmix.json").read_text())["resume"]
    (q / ".localmix-progress.json").write_text(json.dumps({**record, "complete": False}))
    (q / "localmix.json").unlink()  # as if killed before the manifest
    (q / ".model-00001-of-00002.safetensors.tmp").write_bytes(b"half")
    convert(tiny, q, Settings(group_size=32, method="rtn"))
    assert not list(q.glob(".*.tmp"))
    with pytest.raises(ConvertError, match="is not a directory"):
        (tmp_path / "file").write_text("x")
        convert(tiny, tmp_path / "file", Settings(group_size=32, method="rtn"))


# -- the promise, fuzzed ----------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 2**63, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=5,
)


@st.composite
def mutation(draw, doc: object) -> object:
    """`doc` with one value somewhere in it replaced or deleted, or all of it replaced."""
    doc = copy.deepcopy(doc)
    kind = draw(st.sampled_from(["set", "set", "delete", "replace"]))
    if kind == "replace" or not isinstance(doc, (dict, list)) or not doc:
        return draw(JSON)
    node = doc
    while True:
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        if kind == "delete":
            del node[key]
        else:
            node[key] = draw(JSON)
        return doc


@st.composite
def damaged_model(draw, tiny: Path, quantized: Path, root: Path) -> tuple[Path, Path, str]:
    """A copy of the tiny model and of its quantized version under `root`, one file damaged:
    returns (source, quantized copy, what was damaged)."""
    src, q = root / "src", root / "q"
    shutil.copytree(tiny, src)
    shutil.copytree(quantized, q)
    target = draw(st.sampled_from(["header", "header bytes", "config", "config bytes", "manifest"]))
    if target == "header":
        path = draw(st.sampled_from(shards(src) + shards(q)))
        rewrite_header(path, draw(mutation(header_of(path))))
    elif target == "header bytes":
        path = draw(st.sampled_from(shards(src) + shards(q)))
        data = bytearray(path.read_bytes())
        at = draw(st.integers(0, min(len(data) - 1, 600)))
        data[at : at + 8] = draw(st.binary(min_size=1, max_size=8))
        path.write_bytes(bytes(data[: draw(st.integers(0, len(data)))]))
    elif target == "config":
        path = draw(st.sampled_from([src, q])) / "config.json"
        path.write_text(json.dumps(draw(mutation(json.loads(path.read_text())))))
    elif target == "config bytes":
        (draw(st.sampled_from([src, q])) / "config.json").write_bytes(draw(st.binary(max_size=40)))
    else:
        path = q / "localmix.json"
        path.write_text(json.dumps(draw(mutation(json.loads(path.read_text())))))
    return src, q, target


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_the_promise_holds_for_damaged_files(tiny, quantized, tmp_path_factory, data):
    """show, run and quantize on damaged checkpoints, configs and manifests: success, or exit 1
    with one line and no traceback; nothing changes outside the command's target."""
    root = tmp_path_factory.mktemp("fuzz")
    src, q, damaged = data.draw(damaged_model(tiny, quantized, root))
    command = data.draw(st.sampled_from(["show", "run", "quantize"]))
    model = data.draw(st.sampled_from([src, q]))
    target = None
    if command == "show":
        args = ["show", str(model)]
    elif command == "run":
        args = ["run", str(model), "hi", "--max-tokens", "1"]
    else:
        target = data.draw(st.sampled_from([q, root / "new"]))
        args = ["quantize", str(src), str(target), "--method", "rtn", "--group-size", "32"]
    before = tree(root)
    r = invoke(*args)
    event(f"{damaged}: {command} exit {r.exit_code}")
    assert r.exit_code in (0, 1), (damaged, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), (damaged, r.exception)
    assert "Traceback" not in r.output
    if r.exit_code == 1:
        lines = r.stderr.strip().splitlines()
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], r.stderr
    after = tree(root)
    if target is not None:
        inside = str(target.relative_to(root)) + "/"
        before = {k: v for k, v in before.items() if not k.startswith(inside)}
        after = {k: v for k, v in after.items() if not k.startswith(inside)}
    assert after == before
    shutil.rmtree(root)


def test_an_index_is_written_only_over_the_tensors_its_shards_hold(tmp_path):
    """write_index reads each shard's header for the total size: a name the shard lacks (a
    resumed conversion's record out of step with its files) is the shard's error, not a
    KeyError."""
    write_file(tmp_path / "a.safetensors", {"x": torch.zeros(4)}, {})
    write_index(tmp_path, {"x": "a.safetensors"})
    assert read_index_size(tmp_path) == 16
    with pytest.raises(SafetensorsError, match="a.safetensors: holds no tensor y"):
        write_index(tmp_path, {"x": "a.safetensors", "y": "a.safetensors"})


def read_index_size(folder):
    return json.loads((folder / INDEX).read_text())["metadata"]["total_size"]
