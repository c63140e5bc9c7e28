"""Helpers shared by the benchmarks: the "mini" model, timing, tables."""

from __future__ import annotations

import time
from pathlib import Path

from localmix.demo import DEMO_CONFIG, demo_tokenizer_path, write_checkpoint

MINI = dict(
    DEMO_CONFIG,
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=None,
    max_position_embeddings=4096,
)


def mixtral_tokenizer() -> Path:
    """Mixtral's own 32000-piece tokenizer where mistral-common is installed, else the demo's."""
    try:
        import mistral_common
    except ImportError:
        return demo_tokenizer_path()
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def mini_checkpoint(root: Path) -> Path:
    """The ~0.8B-parameter "mini" Mixtral (random bf16 weights), written once under `root`."""
    path = root / "mini"
    if not (path / "model.safetensors").exists():
        write_checkpoint(path, MINI, mixtral_tokenizer(), seed=0)
    return path


def best_of(fn, repeats: int = 3) -> float:
    """The shortest of a few wall-clock timings of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
