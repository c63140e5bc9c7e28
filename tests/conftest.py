"""Shared fixtures: tiny random checkpoints written by transformers, the reference implementation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from localmix.demo import demo_tokenizer_path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels_built():
    """Build localmix's CPU kernels before any test (a minute, once per machine), so that no
    test's output or timing depends on whether it happened to come first."""
    from localmix.quant.kernels import cpu_kernels

    cpu_kernels()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own model store, never the user's."""
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def tiny_mixtral_config(**overrides):
    from transformers import MixtralConfig

    args = dict(
        vocab_size=2000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    args.update(overrides)
    return MixtralConfig(**args)


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


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    """A tiny fp32 Mixtral in the Hugging Face layout, and its transformers model."""
    path = tmp_path_factory.mktemp("tiny_mixtral")
    model = save_reference(path, tiny_mixtral_config())
    return path, model
