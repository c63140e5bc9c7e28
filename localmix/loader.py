"""Loading a Hugging Face-layout checkpoint: build on the meta device, assign tensors mapped from
the files or read into huge pages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from . import hugepages
from .config import ModelConfig
from .errors import CheckpointError
from .model import Rotary, Transformer
from .quant import manifest as quant_manifest
from .quant import safetensors_io
from .quant.formats import QuantError
from .quant.kernels import cpu_kernels
from .quant.linear import swap_linears
from .quant.manifest import Settings, plan_bits
from .quant.names import (
    EMBEDDING,
    EXPERT_RE,
    HEAD_WEIGHT,
    IGNORED_RE,
    LAYER_RE,
    PREFIX,
    SCALES_ZEROS,
    hf_name,
    local_name,
)
from .quant.safetensors_io import SafetensorsFile


@contextmanager
def checkpoint_errors() -> Iterator[None]:
    """The runtime's gate onto `quant`'s file readers: what they refuse is a CheckpointError."""
    try:
        yield
    except QuantError as e:
        raise CheckpointError(str(e)) from e


def checkpoint_files(model_dir: Path) -> dict[str, str]:
    """Map each tensor name to the safetensors file that should hold it
    (`safetensors_io.weight_map`: the index's, whose file names are checked to stay in
    `model_dir`, or every tensor of each `*.safetensors`)."""
    with checkpoint_errors():
        return safetensors_io.weight_map(model_dir)


def open_file(path: Path) -> SafetensorsFile:
    """One safetensors file of a checkpoint, its header checked (`safetensors_io.read_header`)."""
    with checkpoint_errors():
        return SafetensorsFile(path)


def open_shards(model_dir: Path, weight_map: dict[str, str]) -> dict[str, SafetensorsFile]:
    """Each shard the weight map names, its header checked."""
    files: dict[str, SafetensorsFile] = {}
    for tensor, fname in sorted(weight_map.items(), key=lambda kv: kv[1]):
        if fname in files:
            continue
        path = model_dir / fname
        if not path.exists():
            raise CheckpointError(
                f"{path}: missing shard (the index puts tensor '{tensor}' there); "
                "download the model again"
            )
        files[fname] = open_file(path)
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
    embed = PREFIX + EMBEDDING
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


def locate_checkpoint(
    model_dir: Path, expected: dict[str, tuple[torch.Size, torch.dtype]], tied: bool = False
) -> dict[str, tuple[SafetensorsFile, str]]:
    """Check every expected tensor exists with the right shape, and that the checkpoint holds
    no other; return where each lies: its file and its stored name.

    `expected` maps local names to (shape, dtype); `tied`: the output head is the embedding,
    so a stored `lm_head.weight` is a copy that goes unused. Errors name the file and the tensor.
    """
    weight_map = checkpoint_files(model_dir)
    files = open_shards(model_dir, weight_map)
    located: dict[str, tuple[SafetensorsFile, str]] = {}
    by_local = {local_name(n): n for n in weight_map}
    for name, (shape, dtype) in expected.items():
        stored = by_local.get(name)
        if stored is None:
            raise CheckpointError(f"{model_dir}: tensor '{PREFIX}{name}' (or '{name}') is missing")
        f = files[weight_map[stored]]
        info = f.infos.get(stored)
        if info is None:
            raise CheckpointError(f"{f.path}: tensor '{stored}' is missing from this shard")
        if info.shape != tuple(shape):
            raise CheckpointError(
                f"{f.path}: tensor '{stored}' has shape {list(info.shape)}, "
                f"the config asks for {list(shape)}"
            )
        if info.dtype.is_floating_point != dtype.is_floating_point or (
            not dtype.is_floating_point and info.dtype != dtype
        ):
            raise CheckpointError(
                f"{f.path}: tensor '{stored}' holds {info.dtype}, localmix expects {dtype}"
            )
        located[name] = (f, stored)
    used = {by_local[name] for name in expected}
    unused = [
        n
        for n in weight_map
        if n not in used and not IGNORED_RE.search(n) and not (tied and n == HEAD_WEIGHT)
    ]
    if unused:
        raise CheckpointError(
            f"{model_dir}: the checkpoint holds tensors this config does not use "
            f"({', '.join(sorted(unused)[:3])}{', ...' if len(unused) > 3 else ''}); "
            "config.json does not describe these weights"
        )
    return located


def mapped(located: dict[str, tuple[SafetensorsFile, str]]) -> dict[str, torch.Tensor]:
    """The located tensors as views of their files' mappings (no copy; pages read on use)."""
    return {name: f.get(stored) for name, (f, stored) in located.items()}


def resident(located: dict[str, tuple[SafetensorsFile, str]]) -> dict[str, torch.Tensor]:
    """The located tensors read from their files into one huge-page arena (`hugepages`): each
    byte is read once, straight into the arena, so the model is not held twice. The arena is
    freed when no tensor of it is left: a single weight kept alive keeps all of it."""
    arena = hugepages.Arena([f.infos[stored].nbytes for f, stored in located.values()])
    with checkpoint_errors():
        return {
            name: f.read_into(stored, arena.slot(f.infos[stored].nbytes))
            for name, (f, stored) in located.items()
        }


def read_manifest(model_dir: Path) -> dict | None:
    """The gate for a quantized checkpoint's manifest (`quant.manifest.read_manifest`): its
    values checked, or None for a plain Hugging Face checkpoint; a CheckpointError otherwise."""
    with checkpoint_errors():
        return quant_manifest.read_manifest(model_dir)


def quantize_modules(model: Transformer, quantization: dict) -> None:
    """Swap in QuantLinear wherever the manifest's settings put quantized weights."""
    settings = Settings.of(quantization)
    swap_linears(model, lambda name: plan_bits(hf_name(name), settings), quantization["group_size"])


def load_transformer(
    model_dir: Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    manifest: dict | None = None,
    mmap: bool | None = None,
) -> Transformer:
    """Build the model without allocating weights, then assign the checkpoint's tensors.

    On the CPU, weights used in their stored dtype are either views of the file mapping
    (`mmap` True) or read once into memory on huge pages, which the CPU kernels read faster
    (`mmap` False; None: when huge pages are supported, the copy fits in memory and, for a
    quantized model, localmix's own kernels run here). Either way the model is never
    materialised twice. Weights converted to another dtype are new tensors either way.
    """
    check_config(cfg, model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    if manifest is not None:
        quantize_modules(model, manifest["quantization"])
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop(HEAD_WEIGHT)
    expected = {k: (v.shape, v.dtype) for k, v in state.items()}
    floats = {k for k, v in state.items() if v.is_floating_point() and not k.endswith(SCALES_ZEROS)}
    located = locate_checkpoint(model_dir, expected, tied=cfg.tie_word_embeddings)
    kept = {  # used in their stored dtype: what a copy in huge pages would serve as it is
        name: place
        for name, place in located.items()
        if place[0].infos[place[1]].dtype == dtype or name not in floats
    }
    copy = device.type == "cpu" and mmap is not True
    if copy and mmap is None:
        nbytes = sum(f.infos[stored].nbytes for f, stored in kept.values())
        # Without localmix's own kernels, PyTorch's would keep a repacked copy of each
        # quantized weight: the stored one is then better left to the file mapping.
        copy = hugepages.supported() and hugepages.fits(nbytes)
        copy = copy and (manifest is None or cpu_kernels() is not None)
    if copy:
        tensors = mapped({n: p for n, p in located.items() if n not in kept}) | resident(kept)
    else:
        tensors = mapped(located)
    if cfg.tie_word_embeddings:
        tensors[HEAD_WEIGHT] = tensors[EMBEDDING]
    tensors = {
        k: t.to(device=device, dtype=dtype if t.is_floating_point() and k in floats else t.dtype)
        for k, t in tensors.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rotary = Rotary(cfg.head_dim, cfg.rope_theta).to(device)
    return model.eval().requires_grad_(False)
