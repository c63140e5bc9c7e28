"""Tokenizer, streaming detokenizer, and the chat template against mistral-common."""

from __future__ import annotations

import json
import os
import random

import pytest

from localmix.demo import demo_tokenizer_path, nano_path
from localmix.errors import TokenizerError
from localmix.tokenizer import ChatTemplate, CompletionTemplate, Tokenizer, conversation_format


@pytest.fixture(scope="module")
def mixtral_tok():
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    return Tokenizer(path)


def random_text(rng: random.Random) -> str:
    ranges = [(32, 126), (0xA0, 0x17F), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0x1F600, 0x1F64F)]
    out = []
    for _ in range(rng.randint(1, 60)):
        lo, hi = rng.choice(ranges)
        out.append(rng.choice([chr(rng.randint(lo, hi)), " ", "\n", "  "]))
    return "".join(out)


@pytest.mark.parametrize("which", ["mixtral", "demo"])
def test_stream_decoder_reproduces_decode(which, mixtral_tok):
    tok = mixtral_tok if which == "mixtral" else Tokenizer(demo_tokenizer_path())
    rng = random.Random(7)
    split_chars = 0
    for _ in range(300):
        ids = tok.encode(random_text(rng))
        stream = tok.stream()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
        split_chars += sum(p == "" for p in pieces[:-1])
    assert split_chars > 0  # byte-fallback characters really were split across tokens


def test_stream_decoder_keeps_leading_spaces(mixtral_tok):
    ids = mixtral_tok.encode("Hello brave new world")
    stream = mixtral_tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert pieces[0] == "Hello" and pieces[1].startswith(" ")


@pytest.mark.parametrize("which", ["mixtral", "nano"])
def test_continuation_stream_keeps_the_first_tokens_space(which, mixtral_tok):
    """A reply that continues a text: its first token's leading space is text (indentation of
    the first line of a code continuation), not SentencePiece's dummy prefix."""
    tok = mixtral_tok if which == "mixtral" else Tokenizer(nano_path() / "tokenizer.model")
    rng = random.Random(11)
    for _ in range(200):
        text = "  " + random_text(rng)
        ids = tok.encode_continuation(text)
        stream = tok.stream(continuation=True)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode_continuation(ids) == text.replace("\r", "")


def test_run_json_text_is_the_detokenized_reply_first_token_included():
    from localmix.cli.main import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(
        app,
        [
            "run",
            "demo",
            "def add(a, b):\n",
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "6",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    reply = json.loads(r.stdout)
    tok = Tokenizer(nano_path() / "tokenizer.model")
    assert reply["text"] == tok.decode_continuation(reply["token_ids"])
    assert reply["text"].startswith("        ")  # eight spaces: the body's indentation


def test_bos_eos_from_model(mixtral_tok):
    assert (mixtral_tok.bos_id, mixtral_tok.eos_id) == (1, 2)
    ids = mixtral_tok.encode("hi", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another?"},
    ],
    [
        {"role": "user", "content": "Grüße aus München — 你好 🙂"},
        {"role": "assistant", "content": "Ça va? ñandú"},
        {"role": "user", "content": "Да, спасибо"},
        {"role": "assistant", "content": "日本語も話せます"},
        {"role": "user", "content": "🙂🙂"},
    ],
    [
        {"role": "system", "content": "Answer in French.\nAlways."},
        {"role": "user", "content": "line one\nline two"},
        {"role": "user", "content": "and a second message"},
    ],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "  padded  "},
        {"role": "assistant", "content": " leading space"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "z"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_matches_mistral_common(conversation, mixtral_tok):
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(
        messages=[kinds[m["role"]](content=m["content"]) for m in conversation]
    )
    expected = MistralTokenizer.v1().encode_chat_completion(request).tokens
    assert ChatTemplate(mixtral_tok).encode(conversation) == expected


def test_chat_template_reuses_generated_ids(mixtral_tok):
    template = ChatTemplate(mixtral_tok)
    conv = CONVERSATIONS[1]
    odd = [99, 100, 101]
    ids = template.encode(conv, {"Seven.": odd})
    plain = template.encode(conv)
    assert ids != plain and odd + [2] == ids[ids.index(99) : ids.index(99) + 4]


def test_chat_must_end_with_user(mixtral_tok):
    with pytest.raises(ValueError):
        ChatTemplate(mixtral_tok).encode([{"role": "assistant", "content": "x"}])


def test_completion_format_is_the_conversation_as_one_text(mixtral_tok):
    template = CompletionTemplate(mixtral_tok)
    enc = mixtral_tok.encode
    conv = [
        {"role": "system", "content": "# utils.py"},
        {"role": "user", "content": "def add(a, b):\n"},
        {"role": "assistant", "content": "    return a + b\n"},
        {"role": "user", "content": "def sub(a, b):\n"},
    ]
    cont = mixtral_tok.encode_continuation  # no stray space where one text follows another
    body = cont("def add(a, b):\n") + cont("    return a + b\n") + cont("def sub(a, b):\n")
    assert template.encode(conv) == [mixtral_tok.bos_id] + enc("# utils.py\n\n") + body
    text = "# utils.py\n\ndef add(a, b):\n    return a + b\ndef sub(a, b):\n"
    assert mixtral_tok.decode(template.encode(conv)) == text
    odd = [99, 100, 101]  # the ids the model generated for the reply are reused as they are
    ids = template.encode(conv, {"    return a + b\n": odd})
    assert ids[ids.index(99) : ids.index(99) + 3] == odd and mixtral_tok.eos_id not in ids
    one = [{"role": "user", "content": "def f(x):\n"}]  # one message: what --raw would run
    assert template.encode(one) == mixtral_tok.encode("def f(x):\n", bos=True)
    with pytest.raises(ValueError, match="end with a user"):
        template.encode(conv[:3])
    with pytest.raises(ValueError, match="unknown role"):
        template.encode([{"role": "tool", "content": "x"}, *one])


@pytest.mark.parametrize("which", ["mixtral", "demo"])
def test_encode_continuation_adds_no_space(which, mixtral_tok):
    tok = mixtral_tok if which == "mixtral" else Tokenizer(demo_tokenizer_path())
    rng = random.Random(11)
    for text in ["    return 1\n", "def g():", "\n\nx", " a", ">b", ""] + [
        random_text(rng) for _ in range(200)
    ]:
        ids = tok.encode_continuation(text)
        # as if encoded with the text before it (which a tokenizer may normalise)
        assert tok.decode(tok.encode("a") + ids) == tok.decode(tok.encode("a" + text)), repr(text)
    if which == "mixtral":  # the dummy prefix: encoded plainly, mid-text "    x" gains a space
        assert tok.decode(tok.encode("a") + tok.encode("    x")) == "a     x"


def test_conversation_format_follows_tokenizer_config(tmp_path, mixtral_tok):
    assert isinstance(conversation_format(tmp_path, mixtral_tok), ChatTemplate)  # no file
    assert isinstance(conversation_format(None, mixtral_tok), ChatTemplate)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{% for m in messages %}...{% endfor %}"}))
    assert conversation_format(tmp_path, mixtral_tok).chat_format
    config.write_text(json.dumps({"add_bos_token": True}))  # a base model's
    assert isinstance(conversation_format(tmp_path, mixtral_tok), CompletionTemplate)
    config.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not readable as JSON"):
        conversation_format(tmp_path, mixtral_tok)


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(tmp_path)
