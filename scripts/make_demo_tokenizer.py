"""Train the small SentencePiece tokenizer shipped for the demo model (localmix/data/).

Corpus: the docstrings-and-code text of a fixed list of standard-library modules, so the
tokenizer knows English and Python. Run once; the result is committed.

    python scripts/make_demo_tokenizer.py
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from bpe_tokenizer import train_bpe  # beside this script

MODULES = [
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "functools.py",
    "json/__init__.py",
    "pathlib.py",
    "random.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "typing.py",
    "unittest/case.py",
    "email/message.py",
    "http/client.py",
    "logging/__init__.py",
]


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / m).read_text(encoding="utf-8") for m in MODULES)
    out = Path(__file__).resolve().parent.parent / "localmix" / "data" / "demo_tokenizer.model"
    model = train_bpe(text.splitlines(), 2000, num_threads=1, max_sentence_length=8192)
    out.write_bytes(model)
    print(f"wrote {out} ({len(model)} bytes)")


if __name__ == "__main__":
    main()
