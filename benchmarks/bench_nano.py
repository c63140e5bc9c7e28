"""Benchmarks on nano, the trained model shipped with localmix.

    python -m benchmarks.bench_nano [--dir /tmp/localmix-bench] [--tokens 256]
        [--llama-cpp-source DIR] [--only trunk]

0. The trunk's formats: the KL divergence from the bf16 model that 4-bit experts cost with each
   format of the attention projections and the output head (16-bit, 8-bit, 4-bit), over
   128-token chunks of the held-out text, with each variant's bytes read per token; next to it
   what llama.cpp's F16, Q8_0, Q4_0 and Q4_K_M of the same checkpoint cost, measured the same
   way (where llama.cpp is installed, see benchmarks/llamacpp.py). Chunks of 128 tokens, nano's
   sliding window, because llama.cpp's Mixtral graph applies no sliding window.

1. Quantization quality: held-out perplexity (localmix/data/nano/heldout.txt) for bf16 and for
   4-bit experts at groups 32/64/128 with each method (rtn, mse, wmse), and the KL divergence of
   each from the bf16 model's predictions; then the scatter of perplexity among quantizations
   as good as rtn (its range scaled by 0.98 and 1.02), and the default method's held-out loss
   minus rtn's with its standard error: together they say how much of a perplexity difference
   of this size is noise.
2. Prefetch: precision and recall of predicting layer L+1's (and L+2's) experts by applying
   that layer's gate to layer L's input, over a greedy decode.
3. Expert cache: hit rates of each policy (and the offline optimum) on nano's own routing.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from localmix.quant.convert import Settings, convert
from localmix.quant.formats import (
    DEFAULT_METHOD,
    int4_codes,
    minmax_params,
    round_params,
)
from localmix.quant.manifest import DEFAULT_ATTN, DEFAULT_HEAD

import localmix
from benchmarks import llamacpp
from benchmarks.bench_runtime import localmix_bytes_per_token
from localmix.demo import nano_path
from localmix.evaluate import (
    kl_divergence,
    paired_difference,
    perplexity,
    token_losses,
)
from localmix.model import Expert, route
from localmix.trace import replay

PROMPT = "import os\n\n\ndef read_config(path):\n    "
TRUNKS = [  # (attention, head)
    ("bf16", "bf16"),
    ("int8", "bf16"),
    ("bf16", "int8"),
    ("int8", "int8"),
    ("int4", "bf16"),
    ("bf16", "int4"),
    ("int4", "int8"),
    ("int8", "int4"),
    ("int4", "int4"),
]
TRUNK_CHUNK = 128  # nano's sliding window: llama.cpp's Mixtral graph has none


def heldout_ids(engine) -> list[int]:
    text = (nano_path() / "heldout.txt").read_text()
    return engine.tokenizer.encode(text, bos=True)


def trunk_table(root: Path, llama_source: Path | None, tokens: int) -> None:
    ref = localmix.load(nano_path(), device="cpu")
    ids = heldout_ids(ref)[:tokens]
    chunks = [ids[i : i + TRUNK_CHUNK] for i in range(0, len(ids) - 1, TRUNK_CHUNK)]
    chunks = [c for c in chunks if len(c) >= 2]
    want = [ref.logits(c).float().log_softmax(-1) for c in chunks]  # the bf16 model's, once

    def kl(logits) -> float:  # mean KL(bf16 || variant) over the chunks' positions
        total = sum(
            float((w.exp() * (w - logits(c).float().log_softmax(-1))).sum())
            for c, w in zip(chunks, want, strict=True)
        )
        return total / sum(len(c) for c in chunks)

    print(
        f"0. KL divergence from bf16 (x 1e-3) over the first {len(ids)} held-out tokens in "
        f"{TRUNK_CHUNK}-token chunks; 4-bit g64 {DEFAULT_METHOD} experts; MB read per token"
    )
    print(f"   {'attention':<10}{'head':<8}{'KL':>8}{'MB/token':>10}")
    for attn, head in TRUNKS:
        dst = root / f"nano-trunk-{attn}-{head}"
        shutil.rmtree(dst, ignore_errors=True)
        convert(nano_path(), dst, Settings(attn=attn, lm_head=head))
        engine = localmix.load(dst, device="cpu")
        mb = localmix_bytes_per_token(engine) / 1e6
        mark = "  (default)" if (attn, head) == (DEFAULT_ATTN, DEFAULT_HEAD) else ""
        print(f"   {attn:<10}{head:<8}{kl(engine.logits) * 1e3:>8.3f}{mb:>10.2f}{mark}")
    why_not = llamacpp.unavailable_reason(llama_source)
    if why_not:
        print(f"   llama.cpp: not measured ({why_not})")
        return
    kinds = ["F16", "Q8_0", "Q4_0", "Q4_K_M"]
    ggufs = llamacpp.convert(nano_path(), root / "nano-gguf", llama_source, kinds)
    cfg = ref.config
    for kind, path in ggufs.items():
        llm = llamacpp.LlamaCpp(path, torch.get_num_threads(), TRUNK_CHUNK, logits_all=True)
        mb = llamacpp.bytes_per_token(path, cfg.num_experts_per_tok, cfg.num_local_experts) / 1e6
        got = kl(lambda c, llm=llm: torch.from_numpy(llm.logits(c)))
        print(f"   llama.cpp {kind:<8}{got * 1e3:>8.3f}{mb:>10.2f}")


def quant_table(root: Path) -> None:
    ref = localmix.load(nano_path(), device="cpu")
    ids = heldout_ids(ref)
    methods = ("rtn", "mse", "wmse")
    base = token_losses(ref, ids)
    print(f"1. held-out perplexity over {len(ids)} tokens, and KL divergence from bf16 (x 1e-3)")
    print(f"   bf16       ppl {math.exp(base.mean()):8.3f}")
    versus_rtn = []
    for g in (32, 64, 128):
        cells, losses = [], {}
        for method in methods:
            dst = root / f"nano-q4-g{g}-{method}"
            shutil.rmtree(dst, ignore_errors=True)
            convert(nano_path(), dst, Settings(g, method, attn="bf16", lm_head="bf16"))
            engine = localmix.load(dst, device="cpu")
            losses[method] = token_losses(engine, ids)
            kl = kl_divergence(engine, ref, ids)
            cells.append(f"{method:<4} {math.exp(losses[method].mean()):7.3f} KL {kl * 1e3:5.3f}")
        print(f"   4-bit g{g:<4}" + "   ".join(cells))
        diff, err = paired_difference(losses[DEFAULT_METHOD], losses["rtn"])
        versus_rtn.append(f"g{g} {diff * 1e3:+.3f} +- {err * 1e3:.3f}")
    print(
        f"   {DEFAULT_METHOD} - rtn, mean held-out loss (x 1e-3 nats, +- one standard error over "
        "256-token chunks): " + ", ".join(versus_rtn)
    )
    # How much of a perplexity difference is noise: round-to-nearest over ranges widened or
    # narrowed by 2% are quantizations as good as rtn, yet their perplexities scatter.
    print("   rtn with min..max scaled by 0.98 / 1.02, g64: ", end="")
    scattered = []
    for clip in (0.98, 1.02):
        engine = localmix.load(nano_path(), device="cpu")
        for module in engine.model.modules():
            if isinstance(module, Expert):
                for linear in (module.w1, module.w2, module.w3):
                    linear.weight.data = rtn_clipped(linear.weight.data, 64, clip)
        scattered.append(
            f"ppl {perplexity(engine, ids):.3f} KL {kl_divergence(engine, ref, ids) * 1e3:.3f}"
        )
    print(" / ".join(scattered))


def rtn_clipped(w: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """Round-to-nearest 4-bit over each group's range scaled by `clip`, dequantized."""
    groups = w.float().reshape(-1, group_size)
    scale, zero = round_params(*minmax_params(groups, clip))
    return ((int4_codes(groups, scale, zero) - 8) * scale + zero).reshape(w.shape).to(w.dtype)


def routing_and_prediction(tokens: int) -> dict[int, list[dict[int, list[int]]]]:
    """Greedy decode, recording each layer's input and choice; prints gate-prediction figures."""
    engine = localmix.load(nano_path(), device="cpu")
    moes = engine.model.moe_layers()
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
        for i, m in enumerate(moes)
    ]
    hits = defaultdict(int)
    total = defaultdict(int)
    trace_tokens: list[dict[int, list[int]]] = []
    events = engine.generate(PROMPT, temperature=0, max_tokens=tokens)
    for event in events:
        if not hasattr(event, "token_id"):
            continue
        chosen = {i: set(experts) for i, experts in enumerate(engine.expert_routing())}
        trace_tokens.append({i: sorted(c) for i, c in chosen.items()})
        for i in range(len(moes)):
            x = inputs[i][-1:]
            for ahead in (1, 2):
                if i + ahead < len(moes):
                    _, pred = route(moes[i + ahead].gate(x), moes[0].top_k)
                    hits[ahead] += len(set(pred[0].tolist()) & chosen[i + ahead])
                    total[ahead] += moes[0].top_k
    for h in hooks:
        h.remove()
    print(
        f"2. gate-based prefetch prediction over {len(trace_tokens)} decoded tokens "
        "(top-2 predicted, top-2 used: precision = recall)"
    )
    for ahead in (1, 2):
        print(f"   {ahead} layer(s) ahead: {hits[ahead] / total[ahead]:.3f}")
    return {0: trace_tokens}


def cache_table(trace: dict[int, list[dict[int, list[int]]]], layers: int, experts: int) -> None:
    print("3. expert-cache hit rate on nano's routing")
    print("   slots  " + "".join(f"{p:>12}" for p in ("lru", "transition", "belady")))
    for slots in range(2, experts):
        rates = [
            replay(trace, layers, slots, p, None, 1).hit_rate
            for p in ("lru", "transition", "belady")
        ]
        print(f"   {slots:<7}" + "".join(f"{r:>12.3f}" for r in rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-bench"))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--llama-cpp-source", type=Path, default=None)
    ap.add_argument("--only", choices=["trunk"], default=None)
    ap.add_argument("--kl-tokens", type=int, default=8192, help="held-out tokens for table 0")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    cfg = localmix.load(nano_path(), device="cpu").config
    trunk_table(args.dir, args.llama_cpp_source, args.kl_tokens)
    if args.only == "trunk":
        return
    quant_table(args.dir)
    trace = routing_and_prediction(args.tokens)
    cache_table(trace, cfg.num_hidden_layers, cfg.num_local_experts)


if __name__ == "__main__":
    main()
