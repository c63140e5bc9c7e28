"""nano, the trained model shipped in the package."""

from __future__ import annotations

import json
import math

import pytest
import torch

import localmix
from localmix.demo import nano_path
from localmix.evaluate import paired_difference, perplexity, token_losses

pytestmark = pytest.mark.skipif(
    not (nano_path() / "model.safetensors").exists(), reason="nano weights not in this checkout"
)

HELDOUT_PPL_BOUND = 30.0  # the shipped weights: 25.5 on this slice, 21.2 on all held-out text


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
    a = nano.complete("def read_config(path):\n", temperature=0, max_tokens=40)
    nano.reset()
    b = nano.complete("def read_config(path):\n", temperature=0, max_tokens=40)
    assert a.token_ids == b.token_ids and a.generated_tokens == 40
    words = ("return", "self", "class", "if", "import", "def", "(", "=", '"""', "\n    ")
    assert sum(w in a.text for w in words) >= 3, a.text  # Python, not noise
    c = nano.complete("def read_config(path):\n", temperature=0.8, seed=1, max_tokens=40)
    d = nano.complete("def read_config(path):\n", temperature=0.8, seed=1, max_tokens=40)
    assert c.token_ids == d.token_ids


def test_nano_is_a_base_model_that_chat_continues(nano):
    """nano never saw a chat template: chat and `run` without --raw continue the text."""
    assert not nano.template.chat_format
    prompt = "def read_config(path):\n"
    plain = nano.complete(prompt, temperature=0, max_tokens=12)
    nano.reset()
    events = list(nano.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=12))
    assert [e.token_id for e in events if hasattr(e, "token_id")] == plain.token_ids


def test_heldout_perplexity_is_below_bound(nano):
    text = (nano_path() / "heldout.txt").read_text()
    ids = nano.tokenizer.encode(text, bos=True)[8000:12097]  # past the codec tables up front
    ppl = perplexity(nano, ids)
    assert ppl < HELDOUT_PPL_BOUND, ppl
    losses = token_losses(nano, ids)
    assert len(losses) == len(ids) - 1
    assert math.isclose(math.exp(float(losses.mean())), ppl, rel_tol=1e-9)
    report = json.loads((nano_path() / "training.json").read_text())
    assert report["val_ppl"] < HELDOUT_PPL_BOUND


def test_paired_difference_takes_its_error_over_blocks():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1024, generator=gen, dtype=torch.float64)
    assert paired_difference(a, a) == (0.0, 0.0)
    # A difference constant within each 256-token block: its error is that of 4 block means.
    steps = torch.tensor([0.1, 0.3, 0.2, 0.6], dtype=torch.float64).repeat_interleave(256)
    diff, err = paired_difference(a + steps, a)
    assert math.isclose(diff, 0.3) and math.isclose(err, float(steps[::256].std()) / 2)
    with pytest.raises(ValueError, match="different texts"):
        paired_difference(a, a[:-1])
    with pytest.raises(ValueError, match="at least"):
        paired_difference(a[:300], a[:300])


def test_quantized_nano_is_as_good_on_pytorchs_kernels(tmp_path, monkeypatch):
    """nano quantized by `localmix quantize`, scored on held-out text with localmix's kernels
    and with PyTorch's (LOCALMIX_CPU_KERNELS=0, weights packed for this CPU at load): within 1%.
    Chunks of 64 tokens keep every quantized product on a kernel path."""
    from localmix.cli.main import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["quantize", "demo", str(tmp_path / "nano-q4")])
    assert r.exit_code == 0, r.output
    q = localmix.load(tmp_path / "nano-q4", device="cpu")
    text = (nano_path() / "heldout.txt").read_text()
    ids = q.tokenizer.encode(text, bos=True)[8000:9025]
    ours = perplexity(q, ids, chunk=64)
    monkeypatch.setenv("LOCALMIX_CPU_KERNELS", "0")
    assert q.kernels().startswith("PyTorch")
    theirs = perplexity(q, ids, chunk=64)
    assert ours < 40  # about 31: 64-token chunks see less context than the 256 above
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)
