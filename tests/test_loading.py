"""Config parsing and checkpoint loading: every bad input is a clear error of our own type."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import localmix
from localmix import hugepages
from localmix.config import ModelConfig
from localmix.errors import CheckpointError, ConfigError, ModelNotFoundError, OptionError
from tests.helpers import save_reference, tiny_mixtral_config, vm_flags

BASE = {
    "model_type": "mixtral",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "rope_theta": 1e6,
}


def test_config_spellings():
    a = ModelConfig.from_dict(BASE)
    b = ModelConfig.from_dict(
        {
            **{k: v for k, v in BASE.items() if k != "rope_theta"},
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
            "head_dim": None,
        }
    )
    assert a.rope_theta == b.rope_theta == 1e6 and a.head_dim == b.head_dim == 16
    c = ModelConfig.from_dict({**BASE, "head_dim": 32, "sliding_window": 4096})
    assert c.head_dim == 32 and c.sliding_window == 4096
    assert ModelConfig.from_dict({**BASE, "sliding_window": None}).sliding_window is None
    dense = ModelConfig.from_dict({**BASE, "model_type": "mistral"})
    assert not dense.is_moe and dense.num_local_experts == 0


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "llama"}, "unknown model_type 'llama'"),
        ({"model_type": None}, "missing field 'model_type'"),
        ({"hidden_size": None}, "missing field 'hidden_size'"),
        ({"num_local_experts": None}, "missing field 'num_local_experts'"),
        ({"rope_theta": None}, "missing field 'rope_theta'"),
        ({"sliding_window": "big"}, "sliding_window"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ],
)
def test_config_errors_name_field_and_file(tmp_path, change, match):
    raw = {**BASE, **change}
    (tmp_path / "config.json").write_text(
        json.dumps({k: v for k, v in raw.items() if v is not None})
    )
    with pytest.raises(ConfigError, match=match) as e:
        ModelConfig.from_file(tmp_path)
    if "field" in match or "model_type" in match:
        assert "config.json" in str(e.value)


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)


@pytest.fixture
def sharded(tmp_path):
    save_reference(tmp_path, tiny_mixtral_config(), max_shard_size="100KB")
    return tmp_path


def test_missing_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: missing shard .*tensor '"):
        localmix.load(sharded, device="cpu")


def test_truncated_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated: tensor '.*'"):
        localmix.load(sharded, device="cpu")


def test_corrupt_header(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        localmix.load(sharded, device="cpu")


@pytest.mark.parametrize(
    "key, value, error",
    [
        (
            "intermediate_size",
            96,
            r"model.safetensors: tensor '.*experts.0.w1.weight' has shape \[128, 64\], the "
            r"config asks for \[96, 64\]",
        ),
        ("num_hidden_layers", 3, "asks for 3 layers, the checkpoint holds 2"),
    ],
    ids=["wrong-shape", "missing-tensor"],
)
def test_config_that_does_not_fit_the_weights(tmp_path, key, value, error):
    save_reference(tmp_path, tiny_mixtral_config())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=error):
        localmix.load(tmp_path, device="cpu")


def test_pickle_checkpoints_are_refused(tmp_path, tiny_mixtral):
    shutil.copy(tiny_mixtral[0] / "config.json", tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        localmix.load(tmp_path, device="cpu")


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="localmix pull someone/model"):
        localmix.load("someone/model")
    with pytest.raises(ModelNotFoundError, match="demo"):
        localmix.load("nothing-here")


def expert_weight(engine) -> torch.Tensor:
    return engine.model.layers[0].block_sparse_moe.experts[1].w1.weight


def test_weights_are_views_of_the_file(tiny_mixtral):
    engine = localmix.load(tiny_mixtral[0], device="cpu", dtype="fp32", mmap=True)
    w = expert_weight(engine)
    assert not w.untyped_storage().resizable()  # backed by the mmap, not an owned allocation
    path = engine.path / "model.safetensors"
    mapped = [
        p for p in Path(f"/proc/{os.getpid()}/maps").read_text().splitlines() if str(path) in p
    ]
    start, end = (int(a, 16) for a in mapped[0].split()[0].split("-"))
    assert start <= w.data_ptr() < end


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc")
def test_weights_are_read_into_huge_pages_where_supported(tiny_mixtral):
    """By default CPU weights in their stored dtype are read into memory advised for huge
    pages (`hg`) when the system gives them, with the values of the file; `mmap=True` maps."""
    mapped = localmix.load(tiny_mixtral[0], device="cpu", mmap=True)
    default = localmix.load(tiny_mixtral[0], device="cpu")
    w = expert_weight(default)
    assert ("hg" in vm_flags(w)) == hugepages.supported()
    assert "hg" not in vm_flags(expert_weight(mapped))
    for (name, a), (_, b) in zip(
        default.model.state_dict().items(), mapped.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
        if a.device.type == "cpu" and a.numel() and hugepages.supported():
            assert a.data_ptr() % hugepages.ALIGN == 0, name  # on a cache line
    ids = [1, 5, 9, 2]
    assert torch.equal(default.logits(ids), mapped.logits(ids))


@pytest.mark.skipif(not hugepages.supported(), reason="transparent huge pages are off here")
def test_weights_stay_mapped_when_a_copy_would_not_fit(tiny_mixtral, monkeypatch):
    forced = localmix.load(tiny_mixtral[0], device="cpu", mmap=False)
    assert "hg" in vm_flags(expert_weight(forced))
    weights = (tiny_mixtral[0] / "model.safetensors").stat().st_size  # > 80% of the free
    monkeypatch.setattr("localmix.options.available_memory", lambda device: weights)
    engine = localmix.load(tiny_mixtral[0], device="cpu", context=16)
    assert "hg" not in vm_flags(expert_weight(engine))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from tests.helpers import quantized_six_experts

    return quantized_six_experts(tmp_path_factory)


def quantized_parts(engine) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert's 4-bit weight (stored as uint8) and a norm's weight (a float)."""
    layer = engine.model.layers[0]
    return layer.block_sparse_moe.experts[0].w1.qweight, layer.input_layernorm.weight


@pytest.mark.skipif(not hugepages.supported(), reason="transparent huge pages are off here")
def test_only_the_weights_kept_in_their_dtype_are_read_into_huge_pages(quantized):
    """A dtype asked for converts the floats (new tensors either way); the 4-bit weights, used
    as stored, still go to huge pages, by default and with mmap=False."""
    for options in ({}, {"mmap": False}):
        engine = localmix.load(quantized, device="cpu", dtype="fp32", **options)
        qweight, norm = quantized_parts(engine)
        assert "hg" in vm_flags(qweight) and norm.dtype == torch.float32
        assert "hg" not in vm_flags(norm)


@pytest.mark.skipif(not hugepages.supported(), reason="transparent huge pages are off here")
def test_quantized_weights_stay_mapped_without_localmixs_kernels(quantized, monkeypatch):
    """PyTorch's kernels keep a repacked copy of each quantized weight: the stored one then
    stays a file view the system may drop, unless mmap=False says otherwise."""
    monkeypatch.setattr("localmix.loader.cpu_kernels", lambda: None)
    assert "hg" not in vm_flags(quantized_parts(localmix.load(quantized, device="cpu"))[0])
    forced = localmix.load(quantized, device="cpu", mmap=False)
    assert "hg" in vm_flags(quantized_parts(forced)[0])


def test_no_mmap_with_offloading_is_refused(quantized):
    with pytest.raises(OptionError, match="expert store"):
        localmix.load(quantized, device="cpu", expert_slots=2, mmap=False)


def test_cgroup_limits_bound_the_available_memory(tmp_path):
    """A container's memory limit (cgroup v2 or v1, set here or above) bounds what is free."""
    from localmix.options import cgroup_memory_left

    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    (root / "box" / "app").mkdir(parents=True)
    proc.write_text("0::/box/app\n")
    assert cgroup_memory_left(proc, root) is None  # no files: no limit known
    (root / "box" / "app" / "memory.max").write_text("max\n")
    (root / "box" / "memory.max").write_text(str(8 * 2**30))
    (root / "box" / "memory.current").write_text(str(3 * 2**30))
    assert cgroup_memory_left(proc, root) == 5 * 2**30  # the parent's limit
    (root / "box" / "app" / "memory.max").write_text(str(2 * 2**30))
    (root / "box" / "app" / "memory.current").write_text(str(2 * 2**30 + 5))
    assert cgroup_memory_left(proc, root) == 0  # over its own: nothing left
    (root / "memory" / "v1").mkdir(parents=True)
    proc.write_text("4:memory:/v1\n0::/\n")
    (root / "memory" / "v1" / "memory.limit_in_bytes").write_text(str(2**30))
    (root / "memory" / "v1" / "memory.usage_in_bytes").write_text(str(2**29))
    assert cgroup_memory_left(proc, root) == 2**29
    (root / "memory" / "v1" / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert cgroup_memory_left(proc, root) is None  # v1's "no limit"


def test_a_file_cut_short_while_loading_is_a_clear_error(tmp_path):
    from localmix.quant.safetensors_io import SafetensorsError, SafetensorsFile, write_file

    path = tmp_path / "model.safetensors"
    write_file(path, {"w": torch.arange(64, dtype=torch.float32)}, {})
    f = SafetensorsFile(path)  # header read and checked
    with open(path, "r+b") as raw:
        raw.truncate(path.stat().st_size - 10)
    with pytest.raises(SafetensorsError, match="truncated while reading tensor 'w'"):
        f.read_into("w", torch.empty(256, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs 256 contiguous bytes"):
        f.read_into("w", torch.empty(300, dtype=torch.uint8))
    path.unlink()
    with pytest.raises(SafetensorsError, match="could not be read"):
        f.read_into("w", torch.empty(256, dtype=torch.uint8))


def test_mmap_option_is_checked():
    with pytest.raises(OptionError, match="mmap must be True or False"):
        localmix.load("demo", device="cpu", mmap="no")


def test_peak_rss_while_loading_is_bounded(tmp_path):
    """Load and run a ~160 MB bf16 checkpoint in a fresh process: RSS grows < 1.3x its size."""
    from localmix.demo import demo_tokenizer_path, mixtral_config, write_checkpoint

    cfg = mixtral_config(hidden=512, intermediate=1536, layers=4)
    write_checkpoint(tmp_path / "m", cfg, demo_tokenizer_path(), seed=0)
    write_checkpoint(tmp_path / "warm", mixtral_config(), demo_tokenizer_path(), seed=0)
    script = textwrap.dedent(
        f"""
        import json
        import localmix
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        localmix.load({str(tmp_path / "warm")!r}, device="cpu").logits([1, 2, 3])  # lazy inits
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
        e = localmix.load({str(tmp_path / "m")!r}, device="cpu")
        e.logits(list(range(3, 11)))  # touches every weight
        print(json.dumps({{"grew": status("VmHWM") - before}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grew = json.loads(out.stdout.strip().splitlines()[-1])["grew"]
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert size > 150e6
    assert grew < 1.3 * size, (grew, size)


def test_loading_does_not_import_the_compiler():
    """The skeleton is built on the meta device without running initialisers or meta-device
    factories that import torch._dynamo (over a second of every start-up)."""
    code = (
        "import sys, localmix\n"
        "localmix.load('demo', device='cpu')\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
