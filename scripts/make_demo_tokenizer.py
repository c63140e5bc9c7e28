"""Train the small SentencePiece tokenizer shipped for the demo model (localmix/data/).

Corpus: the docstrings-and-code text of a fixed list of standard-library modules, so the
tokenizer knows English and Python. Run once; the result is committed.

    python scripts/make_demo_tokenizer.py
"""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path

import sentencepiece as spm

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
    out = Path(__file__).resolve().parent.parent / "localmix" / "data" / "demo_tokenizer"
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=2000,
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        num_threads=1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        max_sentence_length=8192,
    )
    out.with_suffix(".model").write_bytes(model.getvalue())
    print(f"wrote {out.with_suffix('.model')} ({len(model.getvalue())} bytes)")


if __name__ == "__main__":
    main()
