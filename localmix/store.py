"""The model store: `$LOCALMIX_HOME` (default ~/.cache/localmix), and how names resolve."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TypedDict

from .errors import ModelNotFoundError
from .quant.errors import QuantError
from .quant.files import is_plain_name, read_json
from .quant.manifest import MANIFEST, read_manifest

BUILTIN = ("demo", "nano")  # demo is nano, the model shipped in the package


def home() -> Path:
    return Path(os.environ.get("LOCALMIX_HOME") or Path.home() / ".cache" / "localmix")


def models_dir() -> Path:
    return home() / "models"


def store_name(repo_id: str) -> str:
    """Directory name of a Hub repository in the store: `org/name` -> `org--name`."""
    return repo_id.replace("/", "--")


def entry(name: str) -> Path:
    """The store entry a user-given model name stands for: exactly one entry directly inside
    the store (`org/name` or `org--name`). Names that could reach anything else (empty, `.`,
    `..`, absolute, with `\\` or more than one `/`, hidden) are refused. The entry may not exist."""
    text = str(name)
    folder = store_name(text)
    if text.count("/") > 1 or not is_plain_name(folder) or folder.startswith("."):
        raise ModelNotFoundError(
            f"'{text}' is not a model name of the store; `localmix list` shows the names"
        )
    return models_dir() / folder


def remove(name: str) -> Path:
    """Delete a model from the store: its directory, or only the link where the entry is a
    symbolic link. Nothing outside the entry is touched. Returns the path removed."""
    path = entry(name)
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        raise ModelNotFoundError(
            f"no model '{name}' in the store ({models_dir()}); see `localmix list`"
        )
    return path


def resolve(model: str | os.PathLike) -> tuple[str, Path]:
    """Find a model: a directory path, a store name, a pulled Hub id, or a built-in name."""
    text = str(model)
    if text in BUILTIN:
        from .demo import builtin_model

        return text, builtin_model(models_dir())
    try:
        path = Path(text).expanduser()
        is_dir = bool(text) and path.is_dir()
    except (RuntimeError, ValueError):  # `~nobody/x` (no such user), a NUL in the name
        is_dir = False
    if is_dir:
        return path.name, path
    try:
        found = entry(text)
    except ModelNotFoundError:
        found = None
    if found is not None and found.is_dir():
        return text, found
    raise ModelNotFoundError(
        f"no model '{text}': not a directory, nor in the store ({models_dir()}). "
        f"Pull it with `localmix pull {text}`, or try `demo`."
        if text.count("/") == 1
        else f"no model '{text}': not a directory, nor in the store ({models_dir()}); "
        "`localmix list` shows what is there, and `demo` always works"
    )


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_format(path: Path) -> str:
    """A short description of how a model directory stores its weights."""
    if (path / MANIFEST).exists():
        try:
            manifest = read_manifest(path)
        except QuantError:
            manifest = None
        if manifest is None:
            return f"unreadable ({MANIFEST})"
        q = manifest["quantization"]
        return f"q{q['bits']} g{q['group_size']} ({q['method']})"
    try:
        raw = read_json(path / "config.json")
    except QuantError:
        return "unknown"
    dtype = (raw.get("torch_dtype") or raw.get("dtype")) if isinstance(raw, dict) else None
    return dtype if isinstance(dtype, str) else "unknown"


class StoredModel(TypedDict):
    """A model of the store, as `list_models` describes it."""

    name: str
    path: Path
    size: int  # bytes
    format: str
    modified: float  # seconds since the epoch


def list_models() -> list[StoredModel]:
    """Models in the store: name, size in bytes, format, modified time."""
    folder = models_dir()
    out: list[StoredModel] = []
    for path in sorted(folder.iterdir()) if folder.exists() else []:
        if not path.is_dir() or path.name.startswith(".") or not (path / "config.json").exists():
            continue
        out.append(
            {
                "name": path.name.replace("--", "/"),
                "path": path,
                "size": dir_size(path),
                "format": model_format(path),
                "modified": path.stat().st_mtime,
            }
        )
    return out
