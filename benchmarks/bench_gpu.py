"""Mixtral-8x7B on a GPU: decode and prefill speed, the link, the kernels, memory against the plan.

    python -m benchmarks.bench_gpu [--budgets 12 16 24] [--trace tests/data/humaneval_2_routing.jsonl]
                                   [--tokens 64] [--out benchmarks/results/bench_gpu.json]

Builds a model of Mixtral-8x7B's shapes directly in localmix's format, in memory, from random
codes (no download, no 16-bit source): experts 4-bit g64, trunk bf16. With `--trace`, each MoE
layer routes each token to the two experts Mixtral chose for it in that real trace (the model's
own router still runs, as a prefetch predictor and for its cost), so hit rates are Mixtral's and
not a random model's. Per budget (a 12, 16 or 24 GB card emulated with
torch.cuda.set_per_process_memory_fraction and planned with that cap; and all experts resident,
where the GPU holds them) it prints decode and prefill tokens/s, hit rate, bytes and time on the
link per token, and peak device memory against the plan; once, the measured host-to-device
GB/s and the time of one expert matrix on the fused int4 kernel against a bf16 product of the
same shape. The raw figures go to `--out` as JSON. Without a GPU it prints the plans and says so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import localmix.model as model_module
from localmix.config import MIXTRAL_8X7B, ModelConfig
from localmix.demo import demo_tokenizer_path
from localmix.engine import Engine
from localmix.loader import quantize_modules
from localmix.model import Rotary, Transformer
from localmix.offload import Machine, plan_for, probe_machine
from localmix.tokenizer import Tokenizer
from localmix.trace import read_trace
from localmix.units import GB, GiB

ROOT = Path(__file__).resolve().parents[1]
Q4 = {"bits": 4, "group_size": 64, "method": "rtn", "attn": "bf16", "lm_head": "bf16"}


def random_model(cfg: ModelConfig) -> Transformer:
    """Mixtral's shapes in localmix's format on the host: random codes, small scales."""
    with torch.device("meta"):
        model = Transformer(cfg)
    quantize_modules(model, Q4)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in model.state_dict().items():
        if t.dtype == torch.uint8:
            state[name] = torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=gen)
        elif name.endswith("scales_zeros"):
            sz = torch.empty(t.shape, dtype=torch.bfloat16)
            sz[..., 0], sz[..., 1] = 0.002, 0.0
            state[name] = sz
        else:
            state[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
    return model.eval().requires_grad_(False)


def trace_router(path: Path, top_k: int):
    """A `route` that picks, for MoE layer L and its n-th call, the experts of the trace's n-th
    token at layer L (cycling through the trace), with even weights."""
    trace, _, _ = read_trace(path)
    tokens = [t for prompt in trace.values() for t in prompt]
    calls: dict[int, int] = {}
    real_route = model_module.route

    def route(logits: torch.Tensor, k: int):
        weights, chosen = real_route(logits, k)
        layer = route.layer
        n = calls.get(layer, 0)
        rows = []
        for i in range(logits.shape[0]):
            token = tokens[(n + i) % len(tokens)]
            experts = token.get(layer) or chosen[i].tolist()
            rows.append(experts[:top_k])
        calls[layer] = n + logits.shape[0]
        chosen = torch.tensor(rows, device=logits.device)
        return torch.full_like(weights, 1.0 / top_k), chosen

    route.layer = 0
    return route


def link_speed(device: torch.device, nbytes: int = GiB) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return 3 * nbytes / (time.perf_counter() - t)


def kernel_times(device: torch.device) -> dict[str, float]:
    """One 14336x4096 expert matrix times one row: fused int4 kernel vs a bf16 product (us)."""
    from localmix.quant import QuantLinear, quantize_tensor

    w = (torch.randn(14336, 4096) * 0.02).bfloat16()
    q = quantize_tensor(w, method="rtn")
    layer = QuantLinear(4096, 14336)
    layer.qweight, layer.scales_zeros = q.qweight.to(device), q.scales_zeros.to(device)
    fused = layer.to_kernel_layout()
    wd, x = w.to(device), torch.randn(1, 4096, device=device).bfloat16()

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - t) / 50 * 1e6

    return {
        "int4_us": timed(lambda: layer(x)),
        "bf16_us": timed(lambda: torch.nn.functional.linear(x, wd)),
        "fused_int4": fused,
    }


def run_budget(cfg, model, tokenizer, device, budget, args, mode: str = "gpu") -> dict:
    """Decode and prefill on one emulated card (budget in bytes, None: the whole GPU), with
    missed experts run as `mode` says, next to the decode speed the simulator predicted for
    it from this machine's measured speeds."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    if budget is not None:
        torch.cuda.set_per_process_memory_fraction(budget / total, device)
    torch.cuda.reset_peak_memory_stats(device)
    engine = Engine(
        model,
        tokenizer,
        name="mixtral-shaped",
        path=None,
        device=device,
        dtype=torch.bfloat16,
        context=4096,
    )
    engine.offload_experts(budget, None, "transition", 1, experts=mode)
    plan = engine.plan
    predicted = engine.predictions.get(mode)
    prompt = list(range(3, 3 + args.prompt))
    s = engine.complete(prompt, temperature=0, max_tokens=args.tokens)
    stats = engine.stats()
    assert stats is not None  # offloaded above
    row = {
        "experts": mode,
        "predicted_decode_tok_s": predicted.tokens_per_s if predicted else None,
        "budget_gib": None if budget is None else budget / GiB,
        "slots": plan.slots,
        "plan_device_gib": plan.device_bytes / GiB,
        "peak_device_gib": torch.cuda.max_memory_allocated(device) / GiB,
        "decode_tok_s": s.decode_tokens_per_s,
        "prefill_tok_s": s.prefill_tokens_per_s,
        "hit_rate": stats.summary.hit_rate,
        "link_mb_per_token": stats.summary.bytes_per_token / 1e6,
    }
    engine.offload.close()
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return row


def print_plans(cfg: ModelConfig, budgets: list[int]) -> None:
    for gb in budgets:
        free = {12: 11.76, 16: 15.6, 24: 23.65}.get(gb, gb * 0.98) * GiB
        plan = plan_for(cfg, Q4, None, "cuda", 4096, machine=Machine(int(free), 64 * GiB))
        print(f"{gb} GB card ({free / GiB:.2f} GiB free to CUDA):")
        print(plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="*", default=[12, 16, 24])
    ap.add_argument(
        "--trace", type=Path, default=ROOT / "tests" / "data" / "humaneval_2_routing.jsonl"
    )
    ap.add_argument(
        "--experts", nargs="*", default=["gpu", "hybrid"], help="modes to run each budget in"
    )
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_gpu.json")
    args = ap.parse_args()
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    if not torch.cuda.is_available():
        print("no GPU here: the plans for Mixtral-8x7B (4-bit g64 experts, 4096-token context),")
        print("nothing measured")
        print_plans(cfg, args.budgets)
        return
    device = torch.device("cuda")
    model_module.route = (
        trace_router(args.trace, cfg.num_experts_per_tok) if args.trace else model_module.route
    )
    if args.trace:  # each MoE layer tells the router which layer it is
        forward = model_module.MoeLayer.forward

        def traced_forward(self, x):
            model_module.route.layer = self.layer
            return forward(self, x)

        model_module.MoeLayer.forward = traced_forward
    results = {
        "gpu": torch.cuda.get_device_name(device),
        "host_to_device_gb_s": link_speed(device) / GB,
        "kernels": kernel_times(device),
        "trace": str(args.trace) if args.trace else None,
        "machine": vars(probe_machine(device)),
        "runs": [],
    }
    print(
        f"{results['gpu']}: host-to-device {results['host_to_device_gb_s']:.1f} GB/s; "
        f"one 14336x4096 matrix x 1 row: int4 {results['kernels']['int4_us']:.0f} us, "
        f"bf16 {results['kernels']['bf16_us']:.0f} us"
    )
    tokenizer = Tokenizer(demo_tokenizer_path())
    budgets = [gb * GiB for gb in args.budgets] + [None]
    for budget in budgets:
        for mode in args.experts if budget is not None else ["gpu"]:
            model = random_model(cfg)
            row = run_budget(cfg, model, tokenizer, device, budget, args, mode)
            row["link_ms_per_token"] = (
                row["link_mb_per_token"] * 1e6 / (results["host_to_device_gb_s"] * GB) * 1e3
            )
            results["runs"].append(row)
            name = "whole GPU" if budget is None else f"{budget / GiB:.0f} GiB"
            predicted = row["predicted_decode_tok_s"]
            print(
                f"  {name:>9} {mode:>6}: decode {row['decode_tok_s']:.2f} tok/s (predicted "
                f"{predicted or float('nan'):.2f}), prefill {row['prefill_tok_s']:.1f} tok/s, "
                f"hit rate {row['hit_rate']:.3f}, {row['link_mb_per_token']:.0f} MB "
                f"({row['link_ms_per_token']:.0f} ms) on the link per token, peak "
                f"{row['peak_device_gib']:.2f} GiB of {row['plan_device_gib']:.2f} planned"
            )
            del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"raw figures: {args.out}")


if __name__ == "__main__":
    main()
