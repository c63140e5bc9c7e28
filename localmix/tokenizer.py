"""SentencePiece tokenizer, streaming detokenizer, and the conversation formats: the
Mixtral-Instruct (v1) chat template, and plain continuation for base models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from .errors import TokenizerError

REPLACEMENT = "\ufffd"
# Encoded before text that continues other text, then dropped (see Tokenizer.encode_continuation):
# the second where the first merges with the text (as "<unk>" does with ">b").
CONTINUATION_MARKERS = ("<unk>", "§")
MAX_UTF8_BYTES = 4


class Tokenizer:
    """A SentencePiece model; BOS and EOS ids come from the model file.

    `vocab_size`, the model's: a tokenizer with more pieces than the model has embeddings, or
    without BOS and EOS, is refused here rather than failing in the middle of a reply.
    """

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
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
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise TokenizerError(
                f"{path}: {self.vocab_size} pieces, more than the model's vocabulary "
                f"({vocab_size}); this tokenizer belongs to another model"
            )
        if not 0 <= self.bos_id < self.vocab_size or not 0 <= self.eos_id < self.vocab_size:
            raise TokenizerError(
                f"{path}: the tokenizer has no beginning- or end-of-text token (BOS/EOS), "
                "which localmix needs to start and stop a reply"
            )
        self._markers = [(m, self.sp.EncodeAsIds(m)) for m in CONTINUATION_MARKERS]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` where it follows other text. SentencePiece starts every encoding with a
        space (its dummy prefix), which mid-text is a stray character: "    x" after a line
        would come back with five spaces. As transformers' LlamaTokenizer does, `text` is
        encoded after a marker whose ids are then dropped; where every marker's pieces merged
        with the text's, the plain encoding is used instead."""
        if not text:
            return []
        for marker, marker_ids in self._markers:
            ids = self.sp.EncodeAsIds(marker + text)
            if ids[: len(marker_ids)] == marker_ids:
                return ids[len(marker_ids) :]
        return self.sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids past the vocabulary (a model's padded rows) decode to nothing."""
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def stream(self, continuation: bool = False) -> StreamDecoder:
        """A streaming decoder; with `continuation`, of text that follows other text, so the
        first token's leading space is kept (SentencePiece drops it at the start of a text)."""
        return StreamDecoder(self, self._anchor() if continuation else [])

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """Text that `ids` add where they follow other text (the first space kept)."""
        anchor = self._anchor()
        return self.decode([*anchor, *ids])[len(self.decode(anchor)) :]

    def _anchor(self) -> list[int]:
        """Ids of a marker whose decoded text is the marker itself, to decode after."""
        for marker, ids in self._markers:
            if self.decode(ids) == marker:
                return ids
        return []


class StreamDecoder:
    """Turns token ids into text as soon as that text is final.

    Each `push(id)` returns the new text (maybe ""). Text is decoded in a short window that
    starts one token before the unreleased ones, so SentencePiece's leading-space marker and
    byte-fallback pieces that split a UTF-8 character come out right: a piece ending in an
    incomplete character is held until the character completes. The concatenation of every
    returned piece and `flush()` equals `tokenizer.decode(all ids)`, or, for a decoder made
    with an anchor (`Tokenizer.stream(continuation=True)`), `decode_continuation(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, anchor: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(anchor)  # decoded before the first token, never released
        self.prefix = 0  # start of the decoding window
        self.read = len(self.ids)  # tokens whose text is already released

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


def split_conversation(
    messages: Sequence[dict[str, str]],
) -> tuple[str, list[dict[str, str]]]:
    """(system prompt, the other turns) of a conversation that must end with a user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a conversation to reply to must end with a user message")
    for m in turns:
        if m["role"] not in ("user", "assistant"):
            raise ValueError(f"unknown role '{m['role']}' (use system, user or assistant)")
    return system, turns


class ConversationFormat:
    """How a conversation becomes the token ids a model replies to."""

    chat_format = True  # replies are chat answers (Markdown), not continuations

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
        system, turns = split_conversation(messages)
        return self._encode(system, turns, reply_ids or {})

    def _encode(
        self, system: str, turns: list[dict[str, str]], reply_ids: dict[str, list[int]]
    ) -> list[int]:
        raise NotImplementedError


class ChatTemplate(ConversationFormat):
    """Mixtral-Instruct v1: `<s>[INST] user [/INST] reply</s>[INST] user [/INST]`.

    Matches mistral-common's v1 encoder token for token: each message is encoded on its own,
    a system prompt is put before the first user message (separated by a blank line), and an
    assistant reply ends with EOS. Consecutive user messages are joined by a blank line.
    """

    def _encode(
        self, system: str, turns: list[dict[str, str]], reply_ids: dict[str, list[int]]
    ) -> list[int]:
        ids = [self.tok.bos_id]
        first_user = True
        pending: list[str] = []
        for m in turns:
            role, content = m["role"], m["content"]
            if role == "user":
                pending.append(content)
                continue
            if pending:
                ids += self._user(pending, system if first_user else "")
                first_user, pending = False, []
            known = reply_ids.get(content)
            ids += (known if known is not None else self.tok.encode(content)) + [self.tok.eos_id]
        ids += self._user(pending, system if first_user else "")
        return ids

    def _user(self, contents: list[str], system: str) -> list[int]:
        content = "\n\n".join(contents)
        if system:
            content = system + "\n\n" + content
        return self.tok.encode(f"[INST] {content} [/INST]")


class CompletionTemplate(ConversationFormat):
    """For base models, which were never taught a chat format (nano among them): the
    conversation is one text that the model continues. BOS, the system prompt and a blank line
    if there is one, then every turn's text in order with nothing between them, so a user who
    types `def parse(path):\n` gets the function's body, and a second message carries on
    after the first reply.
    """

    chat_format = False  # replies are continuations (code, prose), shown as they are

    def _encode(
        self, system: str, turns: list[dict[str, str]], reply_ids: dict[str, list[int]]
    ) -> list[int]:
        ids = [self.tok.bos_id]
        parts = [("system", system + "\n\n")] if system else []
        parts += [(m["role"], m["content"]) for m in turns]
        for i, (role, text) in enumerate(parts):
            known = reply_ids.get(text) if role == "assistant" else None
            if known is not None:
                ids += known
            else:  # the first text starts the document, as a prompt to `generate` does
                ids += self.tok.encode(text) if i == 0 else self.tok.encode_continuation(text)
        return ids


def conversation_format(model_dir: Path | None, tokenizer: Tokenizer) -> ConversationFormat:
    """The model's conversation format: Mixtral-Instruct's chat template, unless the model's
    `tokenizer_config.json` exists and names no `chat_template` (the Hugging Face convention
    for a base model), in which case plain continuation."""
    path = model_dir / "tokenizer_config.json" if model_dir is not None else None
    if path is None or not path.exists():
        return ChatTemplate(tokenizer)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TokenizerError(f"{path}: not readable as JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return ChatTemplate(tokenizer) if config.get("chat_template") else CompletionTemplate(tokenizer)
