"""nano, the trained model shipped in the package."""

from __future__ import annotations

import json

import pytest

import localmix
from localmix.demo import nano_path
from localmix.evaluate import perplexity

pytestmark = pytest.mark.skipif(
    not (nano_path() / "model.safetensors").exists(), reason="nano weights not in this checkout"
)

HELDOUT_PPL_BOUND = 40.0  # the shipped weights: 32.8 on this slice, 29.9 on all held-out text


@pytest.fixture(scope="module")
def nano():
    return localmix.load("nano", device="cpu")


def test_nano_loads_offline_and_is_demo(nano):
    assert nano.path == nano_path()
    assert localmix.load("demo", device="cpu").path == nano_path()
    cfg = nano.config
    assert cfg.is_moe and cfg.num_hidden_layers >= 6 and cfg.num_local_experts == 8
    assert cfg.sliding_window is not None and cfg.sliding_window < 256
    assert nano.tokenizer.vocab_size == 4096


def test_seeded_greedy_output_is_deterministic(nano):
    a = nano.complete("def read_config(path):", temperature=0, max_tokens=40)
    nano.reset()
    b = nano.complete("def read_config(path):", temperature=0, max_tokens=40)
    assert a.token_ids == b.token_ids and a.generated_tokens == 40
    words = ("return", "self", "class", "if", "import", "def", "(", "=", '"""', "\n    ")
    assert sum(w in a.text for w in words) >= 3, a.text  # Python, not noise
    c = nano.complete("def read_config(path):", temperature=0.8, seed=1, max_tokens=40)
    d = nano.complete("def read_config(path):", temperature=0.8, seed=1, max_tokens=40)
    assert c.token_ids == d.token_ids


def test_heldout_perplexity_is_below_bound(nano):
    text = (nano_path() / "heldout.txt").read_text()
    ids = nano.tokenizer.encode(text, bos=True)[8000:12097]  # past the codec tables up front
    ppl = perplexity(nano, ids)
    assert ppl < HELDOUT_PPL_BOUND, ppl
    report = json.loads((nano_path() / "training.json").read_text())
    assert report["val_ppl"] < HELDOUT_PPL_BOUND
