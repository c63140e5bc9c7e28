"""What the commands do, as library functions: the default model, pulling a model into the
store (download, then quantize or link), quantizing a checkpoint, and where a model would run on
this machine. The command line parses options and renders these; a script can call them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .defaults import DEFAULT_CONTEXT
from .errors import LocalmixError
from .units import gib

PULL_HINT = "localmix pull mistralai/Mixtral-8x7B-Instruct-v0.1"
ConvertProgress = Callable[[int, int, str], None]  # (source bytes done, total, what)
DownloadProgress = Callable[[str, int, int], None]  # (file, bytes done, file size)


def is_model(name: str) -> bool:
    """Whether `name` names a model (a directory, a store entry or a built-in one)."""
    from .store import resolve

    try:
        resolve(name)
    except LocalmixError:
        return False
    return True


def default_model() -> str:
    """The only model in the store, or an error that says how to get one."""
    from .store import list_models

    models = [m["name"] for m in list_models() if m["name"] != "demo"]
    if len(models) == 1:
        return str(models[0])
    if not models:
        raise LocalmixError(
            f"no model in the store yet: pull one with `{PULL_HINT}`, or try the built-in `demo`"
        )
    raise LocalmixError(f"several models in the store ({', '.join(map(str, models))}): name one")


def quant_settings(
    group_size: int | None = None,
    method: str | None = None,
    attn: str | None = None,
    lm_head: str | None = None,
):
    """The converter's settings (its defaults where None), checked before anything is
    downloaded, read or written."""
    from .quant.errors import QuantError
    from .quant.manifest import Settings, check_settings

    d = Settings()
    settings = Settings(
        d.group_size if group_size is None else group_size,
        d.method if method is None else method,
        d.attn if attn is None else attn,
        d.lm_head if lm_head is None else lm_head,
    )
    try:
        return check_settings(settings)
    except QuantError as e:
        raise LocalmixError(str(e)) from e


def quantize_model(src: Path, dst: Path, settings, progress: ConvertProgress | None = None) -> dict:
    """Quantize the checkpoint in `src` into `dst` (resumably); returns the manifest. A source
    whose config does not describe its checkpoint is refused first."""
    from .config import ModelConfig
    from .loader import check_config
    from .quant.convert import convert
    from .quant.formats import QuantError

    check_config(ModelConfig.from_file(src), src)
    try:
        return convert(src, dst, settings, progress=progress)
    except QuantError as e:
        raise LocalmixError(str(e)) from e


@dataclass(frozen=True)
class Pulled:
    """A model pulled into the store: its repository, where it is, and the quantization
    manifest (None for weights kept as published)."""

    repo: str
    path: Path
    manifest: dict | None


def pull_model(
    ref: str,
    settings=None,
    *,
    download: DownloadProgress | None = None,
    quantizing: ConvertProgress | None = None,
) -> Pulled:
    """Download `ref` (org/name[@revision]) from the Hub and store it: quantized with `settings`
    (from `quant_settings`), or, with None, linked to the download as published."""
    from . import hub
    from .store import models_dir, store_name

    repo, _ = hub.parse_ref(ref)
    dst = models_dir() / store_name(repo)
    snapshot = hub.pull(ref, models_dir(), quantize=settings is not None, progress=download)
    if settings is None:
        link_snapshot(snapshot, dst)
        return Pulled(repo, dst, None)
    return Pulled(repo, dst, quantize_model(snapshot, dst, settings, quantizing))


def link_snapshot(snapshot: Path, dst: Path) -> None:
    """A store entry for unquantized weights: links to the files in the Hugging Face cache."""
    from .quant.manifest import MANIFEST

    if dst.exists():
        if (dst / MANIFEST).exists():
            raise LocalmixError(f"{dst} holds a quantized copy; `localmix rm` it first")
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in snapshot.iterdir():
        (dst / f.name).symlink_to(f.resolve())


def placement_here(cfg, path: Path) -> str:
    """How the model in `path` would be placed on this machine: on the GPU's free memory, or
    in host RAM, as one or more lines."""
    import torch

    from .errors import MemoryBudgetError
    from .loader import read_manifest
    from .offload import plan_for, probe_machine
    from .quant.linear import cuda_int4_kernel

    manifest = read_manifest(path)
    quantization = manifest["quantization"] if manifest else None
    context = min(DEFAULT_CONTEXT, cfg.sliding_window or cfg.max_position_embeddings)
    if not torch.cuda.is_available():
        plan = plan_for(cfg, quantization, None, "cpu", context)
        total = sum(plan.trunk.values()) + plan.kv_cache + plan.host_bytes
        return f"no GPU here: runs on the CPU in about {gib(total)} of RAM"
    device = torch.device("cuda")
    try:
        plan = plan_for(
            cfg,
            quantization,
            None,
            "cuda",
            context,
            machine=probe_machine(device),
            fused_int4=cuda_int4_kernel(device),
        )
    except MemoryBudgetError as e:
        return f"does not fit this machine: {e}"
    if plan.all_resident:
        return str(plan)
    from .hybrid import modes_here

    modes = modes_here(cfg, quantization, "cuda", context, probe_machine(device), torch.bfloat16)
    return f"{plan}\n{modes}"


def quantized_bytes(params: int, group_size: int, bits: int = 4) -> int:
    """Bytes of `params` weights quantized in groups of `group_size`: `bits` per weight and a
    16-bit scale and zero per group."""
    return int(params * (bits + 32 / group_size) / 8)
