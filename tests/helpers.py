"""Helpers the tests share: tiny random checkpoints written by transformers, the reference
implementation, and the data shipped under tests/data."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from benchmarks.common import mixtral_config
from localmix.demo import demo_tokenizer_path

DATA = Path(__file__).parent / "data"
TRACE = DATA / "humaneval_2_routing.jsonl"  # Mixtral-8x7B's real routing (see data/README.md)


def tiny_mixtral_config(**overrides):
    """transformers' MixtralConfig of the tests' tiny model (2 layers of 4 experts, hidden 64),
    built by `benchmarks.common.mixtral_config` with `overrides` on top."""
    from transformers import MixtralConfig

    tiny = dict(
        vocab_size=2000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_local_experts=4,
        max_position_embeddings=512,
        rope_theta=10000.0,
        sliding_window=None,
    )
    return MixtralConfig(**mixtral_config(**{**tiny, **overrides}))


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
    config = tiny_mixtral_config(num_local_experts=6, num_hidden_layers=3)
    save_reference(src, config, dtype=torch.bfloat16)
    dst = tmp_path_factory.mktemp("quantized") / "q"
    convert(src, dst, Settings(method="rtn"))
    return dst
