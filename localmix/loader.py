"""Loading a Hugging Face-layout checkpoint: build on the meta device, assign mmap-backed tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .model import Rotary, Transformer
from .quant.convert import FORMAT_VERSION, MANIFEST, PROGRESS, Settings, plan_bits
from .quant.linear import swap_linears
from .safetensors_io import SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def checkpoint_files(model_dir: Path) -> dict[str, str]:
    """Map each tensor name to the safetensors file that should hold it (from the index).

    Without an index, every tensor of `model.safetensors` (or of each `*.safetensors`) counts.
    """
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from e
        return dict(weight_map)
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


def open_checkpoint(
    model_dir: Path, expected: dict[str, tuple[torch.Size, torch.dtype]]
) -> dict[str, torch.Tensor]:
    """Check every expected tensor exists with the right shape; return them memory-mapped.

    `expected` maps local names to (shape, dtype). Errors name the file and the tensor.
    """
    weight_map = checkpoint_files(model_dir)
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
    tensors: dict[str, torch.Tensor] = {}
    by_local = {local_name(n): n for n in weight_map}
    for name, (shape, _) in expected.items():
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
        tensors[name] = f.get(hf_name)
    return tensors


def read_manifest(model_dir: Path) -> dict | None:
    """The quantized checkpoint's manifest, or None for a plain Hugging Face checkpoint."""
    path = model_dir / MANIFEST
    if not path.exists():
        if (model_dir / PROGRESS).exists():
            raise CheckpointError(
                f"{model_dir}: an unfinished quantization; run the same `localmix quantize` "
                "command again to complete it"
            )
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from e
    version = manifest.get("format_version")
    if manifest.get("format") != "localmix" or not isinstance(version, int):
        raise CheckpointError(f"{path}: not a localmix manifest")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this localmix reads "
            f"({FORMAT_VERSION}); upgrade localmix"
        )
    return manifest


def quantize_modules(model: Transformer, quantization: dict) -> None:
    """Swap in QuantLinear wherever the manifest's settings put quantized weights."""
    settings = Settings(
        group_size=quantization["group_size"],
        method=quantization["method"],
        attn=quantization.get("attn", "bf16"),
        head=quantization.get("lm_head", "bf16"),
    )
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
    tensors = open_checkpoint(model_dir, expected)
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    tensors = {
        k: t.to(device=device, dtype=dtype if t.is_floating_point() and k in floats else t.dtype)
        for k, t in tensors.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rotary = Rotary(cfg.head_dim, cfg.rope_theta).to(device)
    return model.eval().requires_grad_(False)
