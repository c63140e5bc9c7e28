"""The model store: `$LOCALMIX_HOME` (default ~/.cache/localmix), and how names resolve."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError

BUILTIN = ("demo", "nano")  # demo is nano, the model shipped in the package


def home() -> Path:
    return Path(os.environ.get("LOCALMIX_HOME") or Path.home() / ".cache" / "localmix")


def models_dir() -> Path:
    return home() / "models"


def store_name(repo_id: str) -> str:
    """Directory name of a Hub repository in the store: `org/name` -> `org--name`."""
    return repo_id.replace("/", "--")


def resolve(model: str | os.PathLike) -> tuple[str, Path]:
    """Find a model: a directory path, a store name, a pulled Hub id, or a built-in name."""
    text = str(model)
    if text in BUILTIN:
        from .demo import builtin_model

        return text, builtin_model(models_dir())
    path = Path(text).expanduser()
    if path.is_dir():
        return path.name, path
    entry = models_dir() / store_name(text)
    if entry.is_dir():
        return text, entry
    raise ModelNotFoundError(
        f"no model '{text}': not a directory, nor in the store ({models_dir()}). "
        f"Pull it with `localmix pull {text}`, or try `demo`."
        if "/" in text
        else f"no model '{text}': not a directory, nor in the store ({models_dir()}); "
        "`localmix list` shows what is there, and `demo` always works"
    )


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_format(path: Path) -> str:
    """A short description of how a model directory stores its weights."""
    import json

    manifest = path / "localmix.json"
    if manifest.exists():
        try:
            q = json.loads(manifest.read_bytes().decode("utf-8"))["quantization"]
            return f"q{q['bits']} g{q['group_size']} ({q['method']})"
        except (OSError, ValueError, RecursionError, LookupError, TypeError):
            return "unreadable (localmix.json)"
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    if not isinstance(raw, dict):
        return "unknown"
    return str(raw.get("torch_dtype") or raw.get("dtype") or "unknown")


def list_models() -> list[dict[str, object]]:
    """Models in the store: name, size in bytes, format, modified time."""
    folder = models_dir()
    out = []
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
