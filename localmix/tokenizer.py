"""SentencePiece tokenizer, streaming detokenizer, and the Mixtral-Instruct (v1) chat template."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from .errors import TokenizerError

REPLACEMENT = "\ufffd"
MAX_UTF8_BYTES = 4


class Tokenizer:
    """A SentencePiece model; BOS and EOS ids come from the model file."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.exists():
            raise TokenizerError(f"{path}: no tokenizer.model here")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.vocab_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids past the vocabulary (a model's padded rows) decode to nothing."""
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text as soon as that text is final.

    Each `push(id)` returns the new text (maybe ""). Text is decoded in a short window that
    starts one token before the unreleased ones, so SentencePiece's leading-space marker and
    byte-fallback pieces that split a UTF-8 character come out right: a piece ending in an
    incomplete character is held until the character completes. The concatenation of every
    returned piece and `flush()` equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens whose text is already released

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids[self.prefix :])
        if text.endswith(REPLACEMENT) and len(self.ids) - self.read < MAX_UTF8_BYTES:
            return ""  # an unfinished character: wait for its remaining bytes
        return self._release(text)

    def _release(self, text: str) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prefix_text) :] if text.startswith(prefix_text) else ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the very end)."""
        if self.read == len(self.ids):
            return ""
        return self._release(self.tok.decode(self.ids[self.prefix :]))


class ChatTemplate:
    """Mixtral-Instruct v1: `<s>[INST] user [/INST] reply</s>[INST] user [/INST]`.

    Matches mistral-common's v1 encoder token for token: each message is encoded on its own,
    a system prompt is put before the first user message (separated by a blank line), and an
    assistant reply ends with EOS. Consecutive user messages are joined by a blank line.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer

    def encode(
        self,
        messages: Sequence[dict[str, str]],
        reply_ids: dict[str, list[int]] | None = None,
    ) -> list[int]:
        """Token ids for a conversation ending with a user turn (ready for the reply).

        `reply_ids` maps assistant texts to the token ids the model generated for them, so a
        conversation continues from what is already in the KV cache even where re-encoding the
        text would split it differently.
        """
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("a conversation to reply to must end with a user message")
        ids = [self.tok.bos_id]
        first_user = True
        pending: list[str] = []
        for m in turns:
            role, content = m["role"], m["content"]
            if role == "user":
                pending.append(content)
                continue
            if role != "assistant":
                raise ValueError(f"unknown role '{role}' (use system, user or assistant)")
            if pending:
                ids += self._user(pending, system if first_user else "")
                first_user, pending = False, []
            known = (reply_ids or {}).get(content)
            ids += (known if known is not None else self.tok.encode(content)) + [self.tok.eos_id]
        ids += self._user(pending, system if first_user else "")
        return ids

    def _user(self, contents: list[str], system: str) -> list[int]:
        content = "\n\n".join(contents)
        if system:
            content = system + "\n\n" + content
        return self.tok.encode(f"[INST] {content} [/INST]")
