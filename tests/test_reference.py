"""localmix against transformers, the reference implementation, on random checkpoints."""

from __future__ import annotations

import pytest
import torch

import localmix
from tests.helpers import save_reference, tiny_mixtral_config

SHAPES = {
    # name: (config overrides, max_shard_size)
    "mha-one-shard": (dict(heads=4, kv_heads=4), None),
    "gqa2-sharded": (dict(heads=4, kv_heads=2), "100KB"),
    "gqa4-window-large": (
        dict(heads=8, kv_heads=2, window=256),
        None,
    ),
    "gqa2-window-small": (
        dict(heads=4, kv_heads=2, window=16),
        "200KB",
    ),
    "gqa4-window-small-3layers": (
        dict(heads=8, kv_heads=2, window=12, layers=3),
        None,
    ),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    overrides, shard = SHAPES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = save_reference(path, tiny_mixtral_config(**overrides), max_shard_size=shard)
    return path, model, shard


def test_sharded_checkpoints_really_are_sharded(checkpoint):
    path, _, shard = checkpoint
    assert (path / "model.safetensors.index.json").exists() == (shard is not None)
    if shard:
        assert len(list(path.glob("*.safetensors"))) > 1


def test_logits_match_transformers(checkpoint):
    path, ref, _ = checkpoint
    engine = localmix.load(path, device="cpu", dtype="fp32")
    ids = torch.randint(3, 2000, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    got = engine.logits(ids)
    assert got.shape == (40, 2000) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_continuation_matches_transformers(checkpoint):
    path, ref, _ = checkpoint
    engine = localmix.load(path, device="cpu", dtype="fp32")
    prompt = torch.randint(3, 2000, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    expected = out[: out.index(2)] if 2 in out else out
    summary = engine.complete(prompt, temperature=0, max_tokens=32)
    assert summary.token_ids == expected
    assert len(expected) >= 8  # the comparison covers a real continuation


def test_mistral_dense_matches_transformers(tmp_path):
    from transformers import MistralConfig

    cfg = MistralConfig(
        vocab_size=2000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        sliding_window=8,
        max_position_embeddings=256,
    )
    ref = save_reference(tmp_path, cfg)
    engine = localmix.load(tmp_path, device="cpu", dtype="fp32")
    ids = torch.arange(3, 33)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert (engine.logits(ids) - expected).abs().max().item() <= 1e-4
