"""The SentencePiece BPE training that both shipped tokenizers share (the demo model's, by
make_demo_tokenizer.py, and nano's, by train_nano.py): byte fallback, every character covered,
digits split, whitespace kept as it is, UNK 0, BOS 1, EOS 2 and no padding piece."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import sentencepiece as spm


def train_bpe(sentences: Iterable[str], vocab_size: int, **options: Any) -> bytes:
    """A BPE model of `vocab_size` pieces trained on `sentences`, as the bytes of its file;
    `options` are further SentencePiece trainer options (threads, normalisation, sampling)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        **options,
    )
    return model.getvalue()
