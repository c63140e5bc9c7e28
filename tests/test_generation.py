"""Sampling functions and the engine's event stream."""

from __future__ import annotations

import pytest
import torch

import localmix
from localmix.engine import Summary, TokenEvent
from localmix.errors import OptionError
from localmix.sampling import (
    SamplingOptions,
    StopMatcher,
    apply_repetition_penalty,
    make_sampler,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)


def test_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [False, False, True, True, True]
    probs = torch.softmax(logits, -1)  # 0.636, 0.234, 0.086, ...
    kept = ~torch.isinf(top_p_filter(logits, 0.8))
    assert kept.tolist() == [True, True, False, False, False] and probs[:2].sum() > 0.8
    kept = ~torch.isinf(min_p_filter(logits, 0.3))
    assert kept.tolist() == [True, True, False, False, False]
    penalised = apply_repetition_penalty(logits, [0, 4], 2.0)
    assert penalised.tolist() == [1.5, 2.0, 1.0, 0.0, -2.0]


def test_sampler_greedy_and_seeded():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert make_sampler(SamplingOptions(temperature=0))(logits, []) == int(logits.argmax())
    a = [make_sampler(SamplingOptions(temperature=1.0, seed=5))(logits, []) for _ in range(3)]
    draw = make_sampler(SamplingOptions(temperature=1.0, seed=5))
    b = [draw(logits, []) for _ in range(20)]
    assert len(set(a)) == 1 and len(set(b)) > 1  # same seed, same first draw; draws vary


def test_options_validation():
    with pytest.raises(ValueError):
        SamplingOptions(top_p=0)
    with pytest.raises(ValueError, match="unknown sampling option"):
        SamplingOptions().updated(temprature=1)
    assert SamplingOptions().updated(stop="x").stop == ("x",)
    with pytest.raises(OptionError, match="unknown option.*devcie.*loading takes.*device"):
        localmix.load("demo", devcie="cpu")  # a misspelt load option names both families


def test_options_are_one_gate_for_types_and_ranges():
    for bad in (
        {"seed": 2**64},
        {"seed": -1},
        {"seed": 1.5},
        {"top_k": True},
        {"temperature": "hot"},
    ):
        with pytest.raises(OptionError):
            SamplingOptions().updated(**bad)
    with pytest.raises(OptionError):
        SamplingOptions().updated(temperature=float("nan"))
    assert SamplingOptions.parse("seed", str(2**64 - 1)) == 2**64 - 1
    with pytest.raises(OptionError, match="whole number"):
        SamplingOptions.parse("top_k", "x")


def test_extreme_settings_still_sample():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for temperature, penalty in [(1e-300, 1.0), (1.0, 1e-300), (1e300, 1.0), (1.0, 1e300)]:
        opts = SamplingOptions(temperature=temperature, repetition_penalty=penalty, seed=0)
        assert 0 <= make_sampler(opts)(logits, [int(logits.argmax())]) < 50


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["\n\nUser:"])
    out = m.feed("Hello\n") + m.feed("\nUs")
    assert out == "Hello" and not m.stopped
    assert m.feed("er: more") == "" and m.stopped


@pytest.fixture(scope="module")
def demo():
    return localmix.load("demo", device="cpu")


def test_event_stream(demo):
    events = list(demo.generate("def f(x):", temperature=0, max_tokens=12))
    *tokens, summary = events
    assert all(isinstance(e, TokenEvent) and isinstance(e.token_id, int) for e in tokens)
    assert isinstance(summary, Summary)
    assert summary.generated_tokens == 12 == len(summary.token_ids)
    assert summary.stop_reason == "length"
    assert (
        "".join(e.text for e in tokens)
        == summary.text
        == demo.tokenizer.decode_continuation(summary.token_ids)
    )
    assert summary.prompt_tokens == len(demo.tokenizer.encode("def f(x):")) + 1
    assert summary.decode_tokens_per_s > 0 and summary.time_to_first_token_s > 0


def test_seeded_generation_is_deterministic(demo):
    a = demo.complete("import os", temperature=0.9, seed=3, max_tokens=16)
    demo.reset()
    b = demo.complete("import os", temperature=0.9, seed=3, max_tokens=16)
    c = demo.complete("import os", temperature=0.9, seed=4, max_tokens=16)
    assert a.token_ids == b.token_ids != c.token_ids


def test_stop_string_ends_generation(demo):
    full = demo.complete("x = ", temperature=0, max_tokens=20)
    stop = full.text[5:8]
    cut = demo.complete("x = ", temperature=0, max_tokens=20, stop=[stop])
    assert cut.stop_reason == "stop" and cut.text == full.text[: full.text.index(stop)]


def test_eos_stops(tiny_mixtral):
    engine = localmix.load(tiny_mixtral[0], device="cpu", dtype="fp32")
    first = engine.complete([1, 5, 6], temperature=0, max_tokens=3).token_ids[0]
    assert engine.logits([1, 5, 6])[-1, first] > 0
    weight = engine.model.lm_head.weight.clone()
    weight[2] = 2 * weight[first]  # EOS now scores twice the greedy token
    engine.model.lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
    engine.reset()
    s = engine.complete([1, 5, 6], temperature=0, max_tokens=10)
    assert s.stop_reason == "eos" and s.generated_tokens == 0


def test_interrupted_forward_leaves_a_valid_cache(tiny_mixtral):
    engine = localmix.load(tiny_mixtral[0], device="cpu", dtype="fp32", context=8)
    prompt = list(range(3, 30))
    expected = engine.complete(prompt, temperature=0, max_tokens=5).token_ids
    engine.reset()
    engine.complete(prompt[:12], temperature=0, max_tokens=1)  # the ring has wrapped

    def interrupt(module, args):
        raise KeyboardInterrupt

    hook = engine.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.complete(prompt, temperature=0, max_tokens=5)  # dies mid-chunk, layer 0 written
    hook.remove()
    assert engine.complete(prompt, temperature=0, max_tokens=5).token_ids == expected
