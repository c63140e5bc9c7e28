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

HELDOUT_PPL_BOUND = 40.0  # measured on the shipped weights: see training.json and the README


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
    a = nano.complete("def read_lines(path):\n", temperature=0, max_tokens=40)
    nano.reset()
    b = nano.complete("def read_lines(path):\n", temperature=0, max_tokens=40)
    assert a.token_ids == b.token_ids and a.generated_tokens == 40
    assert any(word in a.text for word in ("return", "self", "path", "(", "=")), a.text


def test_heldout_perplexity_is_below_bound(nano):
    text = (nano_path() / "heldout.txt").read_text()
    ids = nano.tokenizer.encode(text, bos=True)[:2049]
    ppl = perplexity(nano, ids)
    assert ppl < HELDOUT_PPL_BOUND, ppl
    assert ppl > 1.5  # a leak of the held-out text into training would show as near 1
    report = json.loads((nano_path() / "training.json").read_text())
    assert report["val_ppl"] < HELDOUT_PPL_BOUND
