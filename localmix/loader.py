"""Loading a Hugging Face-layout checkpoint: build on the meta device, assign mmap-backed tensors."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .model import Rotary, Transformer
from .quant import manifest as quant_manifest
from .quant.files import read_index
from .quant.formats import QuantError
from .quant.linear import swap_linears
from .quant.manifest import Settings, plan_bits
from .safetensors_io import SafetensorsFile

UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.")
IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")  # a buffer older checkpoints saved


def checkpoint_files(model_dir: Path) -> dict[str, str]:
    """Map each tensor name to the safetensors file that should hold it (from the index, whose
    file names are checked to stay in `model_dir`).

    Without an index, every tensor of `model.safetensors` (or of each `*.safetensors`) counts.
    """
    try:
        index = read_index(model_dir)
    except QuantError as e:
        raise CheckpointError(str(e)) from e
    if index is not None:
        return index
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        unsafe = [p.name for p in model_dir.iterdir() if p.suffix in UNSAFE_SUFFIXES]
        if unsafe:
            raise CheckpointError(
                f"{model_dir}: only pickle checkpoints here ({', '.join(unsafe)}); localmix "
                "loads safetensors only, since unpickling a downloaded file can run code"
            )
        raise CheckpointError(f"{model_dir}: no *.safetensors files here")
    out: dict[str, str] = {}
    for f in files:
        for name in SafetensorsFile(f).keys():
            out[name] = f.name
    return out


def local_name(hf_name: str) -> str:
    """Our module path for a checkpoint tensor name (the checkpoint nests the trunk in `model.`)."""
    return hf_name.removeprefix("model.")


def open_shards(model_dir: Path, weight_map: dict[str, str]) -> dict[str, SafetensorsFile]:
    """Each shard the weight map names, its header checked."""
    files: dict[str, SafetensorsFile] = {}
    for hf_name, fname in sorted(weight_map.items(), key=lambda kv: kv[1]):
        if fname in files:
            continue
        path = model_dir / fname
        if not path.exists():
            raise CheckpointError(
                f"{path}: missing shard (the index puts tensor '{hf_name}' there); "
                "download the model again"
            )
        files[fname] = SafetensorsFile(path)
    return files


def check_config(cfg: ModelConfig, model_dir: Path) -> None:
    """The config's sizes against the checkpoint's headers, before anything is built: as many
    layers (and experts per layer) as the files hold, and an embedding of the config's
    vocabulary and hidden size. (Every other shape is checked as the tensors are opened.)"""
    weight_map = checkpoint_files(model_dir)
    layers = {int(m.group(1)) for n in weight_map if (m := LAYER_RE.match(n))}
    if not _numbered(layers, cfg.num_hidden_layers):
        raise CheckpointError(
            f"{model_dir}: config.json asks for {cfg.num_hidden_layers} layers, the checkpoint "
            f"holds {_count(layers)}"
        )
    if cfg.is_moe:
        experts = {int(m.group(2)) for n in weight_map if (m := EXPERT_RE.match(n))}
        if not _numbered(experts, cfg.num_local_experts):
            raise CheckpointError(
                f"{model_dir}: config.json asks for {cfg.num_local_experts} experts per layer, "
                f"the checkpoint holds {_count(experts)}"
            )
    embed = "model.embed_tokens.weight"
    if embed not in weight_map:
        raise CheckpointError(f"{model_dir}: tensor '{embed}' is missing")
    info = open_shards(model_dir, {embed: weight_map[embed]})[weight_map[embed]].infos.get(embed)
    want = (cfg.vocab_size, cfg.hidden_size)
    if info is None or info.shape != want:
        got = "missing" if info is None else f"of shape {list(info.shape)}"
        raise CheckpointError(
            f"{model_dir / weight_map[embed]}: tensor '{embed}' is {got}; config.json asks for "
            f"{list(want)} (vocab_size, hidden_size)"
        )


def _numbered(indices: set[int], n: int) -> bool:
    """Whether `indices` are 0 .. n-1 (without building a range of a config's size)."""
    return len(indices) == n and min(indices, default=0) == 0 and max(indices, default=-1) == n - 1


def _count(indices: set[int]) -> str:
    if _numbered(indices, len(indices)):
        return str(len(indices))
    return f"numbers {sorted(indices)[:8]}{'...' if len(indices) > 8 else ''}"


def open_checkpoint(
    model_dir: Path, expected: dict[str, tuple[torch.Size, torch.dtype]], tied: bool = False
) -> dict[str, torch.Tensor]:
    """Check every expected tensor exists with the right shape, and that the checkpoint holds
    no other; return them memory-mapped.

    `expected` maps local names to (shape, dtype); `tied`: the output head is the embedding,
    so a stored `lm_head.weight` is a copy that goes unused. Errors name the file and the tensor.
    """
    weight_map = checkpoint_files(model_dir)
    files = open_shards(model_dir, weight_map)
    tensors: dict[str, torch.Tensor] = {}
    by_local = {local_name(n): n for n in weight_map}
    for name, (shape, dtype) in expected.items():
        hf_name = by_local.get(name)
        if hf_name is None:
            raise CheckpointError(f"{model_dir}: tensor 'model.{name}' (or '{name}') is missing")
        f = files[weight_map[hf_name]]
        info = f.infos.get(hf_name)
        if info is None:
            raise CheckpointError(f"{f.path}: tensor '{hf_name}' is missing from this shard")
        if info.shape != tuple(shape):
            raise CheckpointError(
                f"{f.path}: tensor '{hf_name}' has shape {list(info.shape)}, "
                f"the config asks for {list(shape)}"
            )
        if info.dtype.is_floating_point != dtype.is_floating_point or (
            not dtype.is_floating_point and info.dtype != dtype
        ):
            raise CheckpointError(
                f"{f.path}: tensor '{hf_name}' holds {info.dtype}, localmix expects {dtype}"
            )
        tensors[name] = f.get(hf_name)
    used = {by_local[name] for name in expected}
    unused = [
        n
        for n in weight_map
        if n not in used and not IGNORED_RE.search(n) and not (tied and n == "lm_head.weight")
    ]
    if unused:
        raise CheckpointError(
            f"{model_dir}: the checkpoint holds tensors this config does not use "
            f"({', '.join(sorted(unused)[:3])}{', ...' if len(unused) > 3 else ''}); "
            "config.json does not describe these weights"
        )
    return tensors


def read_manifest(model_dir: Path) -> dict | None:
    """The gate for a quantized checkpoint's manifest (`quant.manifest.read_manifest`): its
    values checked, or None for a plain Hugging Face checkpoint; a CheckpointError otherwise."""
    try:
        return quant_manifest.read_manifest(model_dir)
    except QuantError as e:
        raise CheckpointError(str(e)) from e


def quantize_modules(model: Transformer, quantization: dict) -> None:
    """Swap in QuantLinear wherever the manifest's settings put quantized weights."""
    settings = Settings.of(quantization)
    swap_linears(model, lambda name: plan_bits(hf_name(name), settings), quantization["group_size"])


def hf_name(local: str) -> str:
    """The checkpoint's name of a local module's weight."""
    return (local if local.startswith("lm_head") else "model." + local) + ".weight"


def load_transformer(
    model_dir: Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    manifest: dict | None = None,
) -> Transformer:
    """Build the model without allocating weights, then assign the checkpoint's tensors.

    In the checkpoint's own dtype on the CPU, weights stay views of the file mapping, so the
    model is never materialised twice.
    """
    check_config(cfg, model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    if manifest is not None:
        quantize_modules(model, manifest["quantization"])
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    expected = {k: (v.shape, v.dtype) for k, v in state.items()}
    floats = {
        k for k, v in state.items() if v.is_floating_point() and not k.endswith("scales_zeros")
    }
    tensors = open_checkpoint(model_dir, expected, tied=cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    tensors = {
        k: t.to(device=device, dtype=dtype if t.is_floating_point() and k in floats else t.dtype)
        for k, t in tensors.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rotary = Rotary(cfg.head_dim, cfg.rope_theta).to(device)
    return model.eval().requires_grad_(False)
