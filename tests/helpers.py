"""Helpers the tests share: tiny random checkpoints written by transformers, the reference
implementation, and the data shipped under tests/data."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from localmix.demo import demo_tokenizer_path, mixtral_config

DATA = Path(__file__).parent / "data"
TRACE = DATA / "humaneval_2_routing.jsonl"  # Mixtral-8x7B's real routing (see data/README.md)


TINY = dict(hidden=64, intermediate=128, layers=2, experts=4, positions=512, window=None)


def tiny_mixtral_config(**keys):
    """transformers' MixtralConfig of the tests' tiny model (2 layers of 4 experts, hidden 64),
    built by `localmix.demo.mixtral_config` with `keys` (its arguments or config.json keys) on
    top."""
    from transformers import MixtralConfig

    return MixtralConfig(**mixtral_config(**{**TINY, "rope_theta": 10000.0, **keys}))


def save_reference(
    path: Path,
    config,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Save a random transformers model (and the demo tokenizer) to `path`; return the model."""
    from transformers import MistralForCausalLM, MixtralForCausalLM

    torch.manual_seed(seed)
    cls = MixtralForCausalLM if config.model_type == "mixtral" else MistralForCausalLM
    model = cls(config).to(dtype).eval()
    with torch.no_grad():  # larger embeddings: random logits that are not near-ties
        model.model.embed_tokens.weight.normal_(0, 1.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    shutil.copyfile(demo_tokenizer_path(), path / "tokenizer.model")
    return model


def quantized_six_experts(tmp_path_factory) -> Path:
    """A bf16 Mixtral of 3 layers and 6 experts, quantized by localmix (rtn): room for expert
    slots fewer than the experts and more than top-2."""
    from localmix.quant.convert import Settings, convert

    src = tmp_path_factory.mktemp("src")
    config = tiny_mixtral_config(experts=6, layers=3)
    save_reference(src, config, dtype=torch.bfloat16)
    dst = tmp_path_factory.mktemp("quantized") / "q"
    convert(src, dst, Settings(method="rtn"))
    return dst


def vm_flags(t: torch.Tensor) -> list[str]:
    """The kernel's flags for the mapping that holds t's first byte (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= t.data_ptr() < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError("no mapping holds the tensor")
