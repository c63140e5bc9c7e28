"""llama.cpp beside localmix in the benchmarks, through llama-cpp-python (the `bench` extra).

The same Hugging Face checkpoint is converted to GGUF by llama.cpp's own converter, which ships
in llama-cpp-python's source distribution (not in its wheel), then quantized by llama.cpp:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python gguf
    pip download llama-cpp-python==VERSION --no-binary :all: --no-deps -d DIR && tar xzf ...

and pass the unpacked folder (or its vendor/llama.cpp) as `--llama-cpp-source`, or set
LLAMA_CPP_SOURCE. Without either, the benchmarks say so and print localmix alone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# llama.cpp's file types (enum llama_ftype) for the formats the benchmarks compare.
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


def unavailable_reason(source: Path | None) -> str:
    """Why llama.cpp cannot be benchmarked here ("" when it can)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install 'localmix[bench]', see docs/benchmarks.md)"
    if converter(source) is None:
        return (
            "llama.cpp's converter was not found: pass --llama-cpp-source (llama-cpp-python's "
            "unpacked source distribution) or set LLAMA_CPP_SOURCE"
        )
    return ""


def converter(source: Path | None) -> Path | None:
    """convert_hf_to_gguf.py under `source` (or $LLAMA_CPP_SOURCE), if it is there."""
    root = source or (
        Path(os.environ["LLAMA_CPP_SOURCE"]) if "LLAMA_CPP_SOURCE" in os.environ else None
    )
    if root is None:
        return None
    for base in (root, root / "vendor" / "llama.cpp"):
        if (base / "convert_hf_to_gguf.py").exists():
            return base / "convert_hf_to_gguf.py"
    return None


def convert(model_dir: Path, out_dir: Path, source: Path | None, kinds: list[str]) -> dict:
    """GGUF files of `model_dir` in each of `kinds` (FTYPES' names), made once under out_dir."""
    import llama_cpp

    script = converter(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "F16.gguf"
    if not f16.exists():
        env = dict(os.environ, PYTHONPATH=str(script.parent / "gguf-py"))
        cmd = [
            sys.executable,
            str(script),
            str(model_dir),
            "--outfile",
            str(f16),
            "--outtype",
            "f16",
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp's converter failed: {done.stderr.strip()[-500:]}")
    paths = {}
    for kind in kinds:
        path = out_dir / f"{kind}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[kind]
            with quiet_stderr():  # llama.cpp logs every tensor it quantizes
                rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama.cpp could not quantize to {kind} (code {rc})")
        paths[kind] = path
    return paths


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 sent to /dev/null for the block (C libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def bytes_per_token(path: Path, top_k: int, experts: int) -> int:
    """Weight bytes a decode step reads from a GGUF: all but the embedding table (one row of
    it), and top_k of every `experts` experts' matrices."""
    from gguf import GGUFReader

    total = 0.0
    for t in GGUFReader(path).tensors:
        if t.name.startswith("token_embd"):
            continue
        total += int(t.n_bytes) * (top_k / experts if "_exps" in t.name else 1)
    return int(total)


class LlamaCpp:
    """A GGUF model loaded by llama.cpp, timed and read the way localmix's engine is."""

    def __init__(self, path: Path, threads: int, context: int = 1024, logits_all: bool = False):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=512,
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )

    def prefill(self, ids: list[int]) -> float:
        """Prompt tokens per second, from an empty cache."""
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t)

    def decode(self, prompt: list[int], tokens: int) -> float:
        """Tokens per second over `tokens` single-token steps after `prompt` (greedy)."""
        self.llm.reset()
        self.llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(tokens):
            self.llm.eval([int(np.argmax(self.last_logits()))])
        return tokens / (time.perf_counter() - t)

    def last_logits(self) -> np.ndarray:
        """The logits of the last token evaluated (llama-cpp-python keeps `scores` only with
        logits_all; the context holds the last token's logits either way)."""
        vocab = self.llm.n_vocab()
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(vocab,))

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len, vocab) float32 logits of a fresh forward (needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)
