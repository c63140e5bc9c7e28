"""Type-check localmix as it is installed.

    python scripts/typecheck.py [mypy options]

pyproject.toml installs `quant/`, `cli/` and `tui/` as `localmix.quant`, `localmix.cli` and
`localmix.tui`, which mypy cannot follow from the source tree (an editable install maps them
with an import hook). This lays the package out as installed, with symbolic links in a
temporary folder, runs mypy on it with the settings in pyproject.toml, and prints the errors
with the repository's own paths.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"quant": "quant", "cli": "cli", "tui": "tui"}  # localmix.<name> -> folder


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="localmix-typecheck-") as tmp:
        package = Path(tmp) / "localmix"
        package.mkdir()
        for entry in (ROOT / "localmix").iterdir():
            if entry.name != "__pycache__":
                (package / entry.name).symlink_to(entry)
        for name, folder in SUBPACKAGES.items():
            (package / name).symlink_to(ROOT / folder)
        command = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "-p",
            "localmix",
            *sys.argv[1:],
        ]
        r = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
    out = r.stdout + r.stderr
    for name, folder in SUBPACKAGES.items():
        out = out.replace(f"localmix/{name}/", f"{folder}/")
    sys.stdout.write(out)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
