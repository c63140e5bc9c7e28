"""The built-in models: nano (trained, shipped in the package) and a seeded random builder.

`demo` and `nano` name nano, a small Mixtral that scripts/train_nano.py trains on Python's
standard library; it writes Python-shaped text, not answers. The random builder writes a small
random Mixtral in the Hugging Face layout, for tests and benchmarks (and as `demo` if the
package data is missing).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .quant.names import EMBEDDING, checkpoint_name
from .quant.safetensors_io import SINGLE_FILE, shard_name, write_file, write_index

if TYPE_CHECKING:  # the random builder imports them when it runs: finding nano needs neither
    import torch

    from .config import ModelConfig


def mixtral_config(
    *,
    vocab: int = 2000,
    hidden: int = 128,
    intermediate: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    experts: int = 8,
    top_k: int = 2,
    positions: int = 4096,
    window: int | None = 1024,
    **keys: Any,
) -> dict[str, Any]:
    """A Mixtral `config.json` as a dict, from the numbers that shape the model (by default the
    demo model's) and any other `keys` of the file, which come last and win. Every small model
    of the demo, the tests, the benchmarks and nano's training is built here."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "max_position_embeddings": positions,
        "sliding_window": window,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        **keys,
    }


DEMO_CONFIG = mixtral_config()
DEMO_SEED = 1234
NANO_NOTE = (
    "nano: a 17M-parameter Mixtral trained on Python's standard library; it continues code, "
    "it does not answer questions"
)
RANDOM_NOTE = "demo model: random weights, so replies are not meaningful"


def nano_path() -> Path:
    return Path(str(resources.files("localmix") / "data" / "nano"))


def builtin_model(store: Path) -> Path:
    """nano from the package; the seeded random model if the package data is missing."""
    nano = nano_path()
    if (nano / SINGLE_FILE).exists():
        return nano
    return ensure_demo(store / "demo")


def builtin_note() -> str:
    return NANO_NOTE if (nano_path() / SINGLE_FILE).exists() else RANDOM_NOTE


def demo_tokenizer_path() -> Path:
    return Path(str(resources.files("localmix") / "data" / "demo_tokenizer.model"))


def random_state_dict(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights in checkpoint naming: N(0, 0.02) matrices, unit norms."""
    import torch

    from .model import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
            if name == EMBEDDING:
                t *= 50  # unit-scale embeddings, so the random model is not all-uniform
        out[checkpoint_name(name)] = t.to(dtype)
    return out


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Tensors as `model.safetensors`, or as numbered shards with an index past the size given."""
    total = sum(t.nbytes for t in tensors.values())
    if total <= max_shard_bytes:
        write_file(folder / SINGLE_FILE, tensors, {"format": "pt"})
        return
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = shard_name(i + 1, len(groups))
        write_file(folder / fname, group, {"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    write_index(folder, weight_map)


def write_checkpoint(
    dst: Path,
    config: dict,
    tokenizer: Path,
    seed: int,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 1 << 62,
) -> Path:
    """Write a seeded random model in the Hugging Face layout into `dst` (atomically), in
    `dtype` (default bf16)."""
    import torch

    from .config import ModelConfig

    cfg = ModelConfig.from_dict(config, source="demo config")
    dtype = dtype or torch.bfloat16
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dst.parent))
    try:
        write_shards(tmp, random_state_dict(cfg, seed, dtype), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def ensure_demo(dst: Path) -> Path:
    """The demo checkpoint at `dst`, written there first if it is not yet."""
    if not (dst / SINGLE_FILE).exists():
        if dst.exists():
            shutil.rmtree(dst)
        write_checkpoint(dst, DEMO_CONFIG, demo_tokenizer_path(), DEMO_SEED)
    return dst
