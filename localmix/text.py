"""Text that comes from outside (argv, a terminal, a file, a request), made fit to encode."""

from __future__ import annotations


def valid_text(text: str) -> str:
    """`text` with what is not valid Unicode replaced by U+FFFD: lone surrogates come from
    bytes that were not UTF-8 (in argv, a terminal, a file) and no tokenizer or file takes them."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
