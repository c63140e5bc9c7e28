"""Train "nano", the small Mixtral-architecture model shipped with localmix, on the CPU.

    python scripts/train_nano.py --out localmix/data/nano [--steps N] [--threads 2]

Corpus: the Python standard library of the interpreter running this script (no tests, no
site-packages), files in a seeded order, 2% of them held out. Tokenizer: SentencePiece BPE with
byte fallback, 4096 pieces, trained on the training files. Model: Mixtral with 6 layers, 8
experts, top-2, the router's load-balancing loss, and a sliding window (128) shorter than the
training context (256), trained with transformers (a dev dependency; the runtime never needs
it) under torch.compile: 1,650 steps of 16 x 256 tokens, about 58 minutes on two cores. Writes
the Hugging Face layout (bf16 safetensors, config.json, tokenizer.model, and a
tokenizer_config.json without a chat template: nano is a base model) and prints training and
held-out loss and perplexity. Seeded: the same machine and versions give the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import sentencepiece as spm
import torch
from bpe_tokenizer import train_bpe  # beside this script

from localmix.demo import mixtral_config

SEED = 0
VOCAB = 4096
CONTEXT = 256
WINDOW = 128
HELD_OUT = 0.02
EXCLUDE_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "ensurepip",
    "_vendor",
}

# nano's Mixtral; 8 experts, top-2 and 4096 positions as the demo model's
MODEL = mixtral_config(
    vocab=VOCAB,
    hidden=256,
    intermediate=384,
    layers=6,
    heads=8,
    kv_heads=4,
    head_dim=32,
    window=WINDOW,
    rope_theta=10000.0,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
)


TOKENIZER_CONFIG = dict(
    tokenizer_class="LlamaTokenizer",
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
    add_bos_token=True,
    add_eos_token=False,
)


def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in EXCLUDE_DIRS or part.startswith("test") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        files.append(p)
    random.Random(SEED).shuffle(files)
    return files


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def chunks(files: list[Path], lines: int = 40):
    """Training text for the tokenizer in pieces of a few dozen lines, newlines kept."""
    for f in files:
        text = read(f).splitlines(keepends=True)
        for i in range(0, len(text), lines):
            yield "".join(text[i : i + lines])


def train_tokenizer(files: list[Path]) -> bytes:
    """BPE with byte fallback. Identity normalisation: newlines and indentation are code."""
    return train_bpe(
        chunks(files),
        VOCAB,
        num_threads=2,
        normalization_rule_name="identity",
        input_sentence_size=400_000,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,
    )


def tokenize(sp: spm.SentencePieceProcessor, files: list[Path]) -> torch.Tensor:
    ids: list[int] = []
    for f in files:
        ids += [1] + sp.EncodeAsIds(read(f)) + [2]
    return torch.tensor(ids, dtype=torch.long)


def write_heldout(out: Path, val_files: list[Path]) -> None:
    """The held-out text, shipped beside the weights so tests can measure perplexity on it."""
    (out / "heldout.txt").write_text("\n".join(read(f) for f in val_files))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batches: int | None = None) -> float:
    """Mean next-token loss over non-overlapping windows of the context length."""
    model.eval()
    n = (len(data) - 1) // CONTEXT
    starts = list(range(0, n * CONTEXT, CONTEXT))
    if batches is not None:
        starts = starts[: batches * 16]
    total, count = 0.0, 0
    for i in range(0, len(starts), 16):
        idx = torch.tensor(starts[i : i + 16])
        x = torch.stack([data[s : s + CONTEXT] for s in idx])
        y = torch.stack([data[s + 1 : s + CONTEXT + 1] for s in idx])
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum"
        ).item()
        count += y.numel()
    model.train()
    return total / count


class Forward:
    """The model's forward under torch.compile (about 13% faster here), falling back to the
    eager model if compiling fails (no C++ compiler, an unsupported platform)."""

    def __init__(self, model, compile: bool) -> None:
        self.model = model
        self.fn = torch.compile(model, dynamic=False) if compile else model

    def __call__(self, **kwargs):
        try:
            return self.fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - any compile failure means: train eagerly
            if self.fn is self.model:
                raise
            print(f"torch.compile failed ({type(exc).__name__}); training eagerly", flush=True)
            self.fn = self.model
            return self.fn(**kwargs)


def balance_loss(out, cfg, balance: str) -> torch.Tensor:
    """The router's load-balancing loss (Switch Transformer's, 2.0 when top-2 routing is even).

    "pooled" is transformers' Mixtral loss, which the shipped nano was trained with: it adds up
    every layer's routing before comparing experts, so it balances each expert index over all
    layers together and lets single layers send half their tokens to one expert (nano's do).
    "per-layer" averages the loss of each layer on its own.
    """
    if balance == "pooled":
        return out.aux_loss
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    k, n = cfg.num_experts_per_tok, cfg.num_local_experts
    losses = [load_balancing_loss_func((g,), n, k) for g in out.router_logits]
    return torch.stack(losses).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1650)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--balance",
        choices=("pooled", "per-layer"),
        default="pooled",
        help="load-balancing loss over all layers' routing together (the shipped nano's) or "
        "per layer (balances every layer; for the next retraining)",
    )
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="train the eager model (torch.compile needs a C++ compiler; it is ~13%% faster)",
    )
    ap.add_argument(
        "--heldout-only",
        action="store_true",
        help="only write heldout.txt into --out (for weights trained earlier)",
    )
    args = ap.parse_args()
    if args.heldout_only:
        files = corpus_files()
        write_heldout(args.out, files[: max(1, int(len(files) * HELD_OUT))])
        return
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    from transformers import MixtralConfig, MixtralForCausalLM

    t0 = time.time()
    files = corpus_files()
    n_val = max(1, int(len(files) * HELD_OUT))
    val_files, train_files = files[:n_val], files[n_val:]
    tok_bytes = train_tokenizer(train_files)
    sp = spm.SentencePieceProcessor(model_proto=tok_bytes)
    train, val = tokenize(sp, train_files), tokenize(sp, val_files)
    print(
        f"corpus: {len(train_files)} training files ({len(train):,} tokens), {len(val_files)} "
        f"held out ({len(val):,} tokens); tokenizer {time.time() - t0:.0f} s",
        flush=True,
    )

    cfg = MixtralConfig(**MODEL)
    cfg._attn_implementation = "sdpa"
    model = MixtralForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters", flush=True)
    forward = Forward(model, compile=not args.no_compile)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(SEED)
    model.train()
    t_start, seen, running = time.time(), 0, None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(train) - CONTEXT - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + CONTEXT] for s in starts])
        y = torch.stack([train[s + 1 : s + CONTEXT + 1] for s in starts])
        out = forward(input_ids=x)
        lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), y.reshape(-1))
        aux = balance_loss(out, cfg, args.balance)
        loss = lm + cfg.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += x.numel()
        running = lm.item() if running is None else 0.98 * running + 0.02 * lm.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_start
            print(
                f"step {step:5d}  loss {running:.3f}  ppl {math.exp(running):7.2f}  "
                f"aux {aux.item():.3f}  {seen / el:,.0f} tok/s  {el / 60:.1f} min",
                flush=True,
            )
    train_loss = evaluate(model, train[: len(val) * 2], batches=20)
    val_loss = evaluate(model, val)
    print(
        f"training loss {train_loss:.3f} (ppl {math.exp(train_loss):.2f}); held-out loss "
        f"{val_loss:.3f} (ppl {math.exp(val_loss):.2f}); {(time.time() - t0) / 60:.1f} min"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    for extra in ("generation_config.json",):
        (args.out / extra).unlink(missing_ok=True)
    (args.out / "tokenizer.model").write_bytes(tok_bytes)
    # No chat_template: nano is a base model, so chat front ends continue its text.
    (args.out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1) + "\n")
    write_heldout(args.out, val_files)
    report = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "steps": args.steps,
        "batch": args.batch,
        "balance": args.balance,
        "context": CONTEXT,
        "tokens_seen": seen,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "minutes": (time.time() - t0) / 60,
        "val_files": [str(f.relative_to(sysconfig.get_paths()["stdlib"])) for f in val_files],
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
