"""The Engine: a loaded model with its tokenizer and KV cache, generating a stream of events."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ModelConfig
from .defaults import DEFAULT_CONTEXT, DEFAULT_EXPERTS
from .errors import CheckpointError, MemoryBudgetError, OptionError
from .events import Event, Summary, TokenEvent
from .kv_cache import RollingKVCache
from .model import RoutingRecorder, Transformer
from .quant.kernels import describe as describe_cpu_kernels
from .quant.linear import QuantLinear, describe_device_kernels
from .sampling import SamplingOptions, StopMatcher, make_sampler
from .text import valid_text
from .tokenizer import ChatTemplate, ConversationFormat, Tokenizer
from .units import gib

if TYPE_CHECKING:
    from .expert_cache import OffloadStats
    from .hybrid import Prediction, Speeds
    from .offload import Machine, Offload, Plan

PREFILL_CHUNK = 512

Progress = Callable[[int, int], None]  # (prompt tokens prefilled so far, prompt tokens to prefill)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine:
    """A model ready to generate. Build one with `localmix.load`.

    The engine keeps one KV cache across calls: a prompt that extends what the cache already
    holds (the next turn of a chat) prefills only its new tokens.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        name: str,
        path: Path | None,
        device: torch.device,
        dtype: torch.dtype,
        context: int | None = None,
        sinks: int = 0,
        defaults: SamplingOptions | None = None,
        template: ConversationFormat | None = None,
    ) -> None:
        self.model, self.tokenizer, self.name, self.path = model, tokenizer, name, path
        self.config: ModelConfig = model.cfg
        self.routing = RoutingRecorder(moe.layer for moe in model.moe_layers())
        model.observe_routing(self.routing)  # for `expert_routing`
        self.device, self.dtype = device, dtype
        self.template = template or ChatTemplate(tokenizer)
        self.defaults = defaults or SamplingOptions()
        window = self.config.sliding_window or self.config.max_position_embeddings
        self.context = min(context or DEFAULT_CONTEXT, window)
        self.sinks = sinks
        self.cache = self.new_cache(self.context, sinks=sinks)
        self._cache_ids: list[int] = []  # tokens whose keys/values are in the cache
        # The ids generated for each reply of the conversation being continued: re-encoding a
        # reply's text need not give them back, and the cache holds these.
        self._reply_ids: dict[str, list[int]] = {}
        self.offload: Offload | None = None  # once experts are served from an expert cache
        self.plan: Plan | None = None
        self._predict: Callable[[], dict[str, Prediction]] | None = None
        self.clock: Callable[[], float] = time.perf_counter  # times the Summary's phases
        self._predictions: dict[str, Prediction] | None = None
        self._experts_auto = True

    def new_cache(
        self, window: int, *, sinks: int = 0, capacity: int | None = None
    ) -> RollingKVCache:
        """A KV cache shaped for this model (window, attention sinks, capacity)."""
        cfg = self.config
        return RollingKVCache(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            window,
            sinks=sinks,
            capacity=capacity,
            dtype=self.dtype,
            device=self.device,
        )

    # -- stateless -----------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits (len, vocab) in float32 from a fresh full forward; the engine's state is kept."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(-1)
        window = self.config.sliding_window or max(len(ids), 1)
        cache = self.new_cache(window, capacity=max(len(ids), 1))
        return self.model(ids, cache).float()

    # -- generation ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation held in the KV cache."""
        self.cache.reset()
        self._cache_ids = []

    def generate(
        self, prompt: str | Sequence[int], *, progress: Progress | None = None, **sampling: Any
    ) -> Generator[Event, None, None]:
        """Stream TokenEvents, then a Summary. A text prompt gets BOS; token ids are used as is.

        `progress(done, total)` is called after each chunk of a prompt longer than one chunk.
        """
        opts = self.defaults.updated(**sampling)
        return self._generate(self.prompt_ids(prompt), opts, progress, continuation=True)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """The token ids `generate` starts from: a text gets BOS; token ids are used as is."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(valid_text(prompt), bos=True)
        return list(prompt)

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        progress: Progress | None = None,
        **sampling: Any,
    ) -> Generator[Event, None, None]:
        """Reply to a conversation ([{"role": ..., "content": ...}], ending with a user turn).

        However long the conversation, a turn that continues the last one prefills only its own
        new tokens: the engine keeps the ids it generated for the conversation's replies.
        """
        opts = self.defaults.updated(**sampling)
        replies = {valid_text(m["content"]) for m in messages if m["role"] == "assistant"}
        self._reply_ids = {t: ids for t, ids in self._reply_ids.items() if t in replies}
        ids = self.chat_ids(messages)
        continuation = not self.template.chat_format  # a base model continues the text
        return self._generate(ids, opts, progress, remember_reply=True, continuation=continuation)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The token ids `chat` replies to: the conversation in the model's format, with the
        replies this engine generated as the ids it generated (what the KV cache holds)."""
        messages = [{**m, "content": valid_text(m["content"])} for m in messages]
        return self.template.encode(messages, self._reply_ids)

    @torch.inference_mode()
    def _prefill(self, ids: list[int], progress: Progress | None) -> tuple[torch.Tensor, int]:
        """Bring the cache to `ids`, reusing the longest prefix it holds; last logits, new count."""
        common = 0
        for a, b in zip(ids, self._cache_ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last token must run to give logits
        if not self.cache.rewind(common):
            self.cache.reset()
            common = 0
        self._cache_ids = ids[:common]
        chunk = min(PREFILL_CHUNK, self.cache.max_chunk)
        logits: torch.Tensor | None = None
        for start in range(common, len(ids), chunk):
            part = ids[start : start + chunk]
            logits = self._forward(part)
            if progress is not None and len(ids) - common > chunk:
                progress(start + len(part) - common, len(ids) - common)
        assert logits is not None  # common < len(ids): at least the last token ran
        return logits, len(ids) - common

    def _forward(self, part: list[int]) -> torch.Tensor:
        """Run new tokens through the model; an interrupted call leaves an empty, valid cache.

        Non-finite logits (NaN or infinite weights) are a CheckpointError, not a token.
        """
        tokens = torch.tensor(part, dtype=torch.long, device=self.device)
        try:
            logits = self.model(tokens, self.cache, last_only=True)[-1]
            # one reduction: a NaN or an infinity makes the float64 sum non-finite
            if not bool(torch.isfinite(logits.sum(dtype=torch.float64))):
                raise CheckpointError(
                    f"the model {self.name} computed NaN or infinite logits: its weights hold "
                    "non-finite values (a corrupt or badly converted checkpoint); quantize or "
                    "download it again"
                )
        except BaseException:  # Ctrl+C mid-forward: some layers may hold half-written keys
            self.reset()
            raise
        self._cache_ids += part
        return logits

    @torch.inference_mode()
    def _step(self, token: int) -> torch.Tensor:
        return self._forward([token])

    def _generate(
        self,
        ids: list[int],
        opts: SamplingOptions,
        progress: Progress | None,
        remember_reply: bool = False,
        continuation: bool = False,
    ) -> Generator[Event, None, None]:
        """The events of one reply to `ids`. A `continuation` keeps its first token's leading
        space (the text goes on from the prompt's); a chat answer starts at its first word."""
        if not ids:
            raise OptionError("empty prompt")
        t0 = self.clock()
        logits, prefilled = self._prefill(ids, progress)
        t_prefill = self.clock() - t0
        sample = make_sampler(opts)
        stream, stops = self.tokenizer.stream(continuation), StopMatcher(opts.stop)
        out_ids: list[int] = []
        history = list(ids)
        pieces: list[str] = []
        reason, t_first = "length", None
        eos = self.tokenizer.eos_id
        for i in range(opts.max_tokens):
            token = sample(logits, history)
            if t_first is None:
                t_first = self.clock()
            if token == eos:
                reason = "eos"
                break
            out_ids.append(token)
            history.append(token)
            text = stops.feed(stream.push(token))
            pieces.append(text)
            yield TokenEvent(token, text)
            if stops.stopped:
                reason = "stop"
                break
            if i + 1 < opts.max_tokens:
                logits = self._step(token)
        if not stops.stopped:
            tail = stops.feed(stream.flush()) + stops.flush()
            if tail:
                pieces.append(tail)
                yield TokenEvent(out_ids[-1], tail)
        t_end = self.clock()
        text = "".join(pieces)
        if remember_reply and reason != "stop":
            self._reply_ids[text] = out_ids
        t_first = t_first or t_end
        n_decode = max(len(out_ids) - 1, 0)
        yield Summary(
            prompt_tokens=len(ids),
            prefilled_tokens=prefilled,
            generated_tokens=len(out_ids),
            text=text,
            token_ids=out_ids,
            time_to_first_token_s=t_first - t0,
            prefill_tokens_per_s=prefilled / t_prefill if t_prefill > 0 else 0.0,
            decode_tokens_per_s=n_decode / (t_end - t_first) if t_end > t_first else 0.0,
            stop_reason=reason,
            context_used=self.cache.used,
            context_size=self.cache.capacity,
            stats=self.stats(),
        )

    def offload_experts(
        self,
        device_memory: str | int | None,
        expert_slots: int | None,
        policy: str,
        prefetch: int,
        machine: Machine | None = None,
        progress: Callable[[int, int], None] | None = None,
        experts: str = DEFAULT_EXPERTS,
        speeds: Speeds | None = None,
    ) -> None:
        """Move the trunk to the device and serve experts from host RAM through a cache.

        On CUDA the plan takes what `machine` (default: probed now) has free, the runtime's
        working memory included, and is checked before anything is allocated.
        `progress(done, total)` follows the experts as the host store fills. `experts` says
        where missed experts run ("gpu", "cpu", "hybrid"; see `localmix.hybrid`); "auto" takes
        the mode the decode simulator predicts fastest with this machine's `speeds` (measured
        once per machine when not given) on a CUDA device, and "gpu" elsewhere. On CUDA the
        speeds also pace prefetching (a guess waits while the link has a copy queued).
        """
        from .hybrid import MODES, fastest, machine_speeds, plans_by_mode, predict_plans
        from .offload import Offload, first_expert, parse_bytes, probe_machine

        cfg = self.config
        budget = parse_bytes(device_memory) if device_memory is not None else None
        if (
            expert_slots is not None
            and not cfg.num_experts_per_tok <= expert_slots <= cfg.num_local_experts
        ):
            raise OptionError(
                f"expert_slots must be between top_k ({cfg.num_experts_per_tok}) and the number "
                f"of experts ({cfg.num_local_experts})"
            )
        if experts not in ("auto", *MODES):
            raise OptionError(f"unknown experts mode '{experts}'; use auto, {', '.join(MODES)}")
        if machine is None and self.device.type == "cuda":
            machine = probe_machine(self.device)
        cuda = self.device.type == "cuda"
        if speeds is None and (experts in ("hybrid", "cpu") or cuda):  # cuda: also for prefetch
            speeds = machine_speeds(
                lambda: first_expert(self.model),
                str(self.device),
                cfg.hidden_size,
                self.dtype,
                self._expert_bytes(),
            )

        def plan(mode: str) -> Plan:
            return self._plan(budget, expert_slots, machine, self.cache.nbytes, self.context, mode)

        modes = MODES if speeds is not None else ("gpu",)
        plans = plans_by_mode(plan, modes, required=None if experts == "auto" else experts)
        if not plans:  # no mode fits: the pure-offload plan's refusal says by how much
            plan("gpu")
        # Predictions are made now only to choose; asked for a mode, `run -v` makes them.
        self._predict = None
        if speeds is not None:
            self._predict = lambda: predict_plans(cfg, plans, speeds, policy)
        self._predictions = None
        self._experts_auto = experts == "auto"
        if experts == "auto":
            experts = fastest(self.predictions) if self.predictions else "gpu"
        self.plan = plans[experts]
        self.offload = Offload(
            self.model,
            self.plan,
            self.device,
            policy,
            prefetch,
            progress=progress,
            mode=experts,
            speeds=speeds,
        )
        self.model.to(self.device)

    @property
    def predictions(self) -> dict[str, Prediction]:
        """The decode speed the simulator predicts for each experts mode on this machine
        ({} where nothing is offloaded or no speeds were measured), made once when first read."""
        if self._predictions is None:
            self._predictions = self._predict() if self._predict is not None else {}
        return self._predictions

    def experts_report(self) -> str:
        """Where missed experts run, why, and each mode's predicted decode speed ("" when
        nothing is offloaded)."""
        from .hybrid import report

        if self.offload is None:
            return ""
        o = self.offload
        return report(o.mode, self.predictions, o.speeds, self._experts_auto)

    def _expert_bytes(self) -> int:
        from .offload import expert_layout, first_expert

        return expert_layout(first_expert(self.model))[1]

    def _plan(
        self,
        budget: int | None,
        max_slots: int | None,
        machine: Machine | None,
        kv_bytes: int,
        context: int,
        mode: str = "gpu",
    ) -> Plan:
        from .offload import first_expert, plan_model
        from .quant.linear import cuda_int4_kernel

        # the experts left the model for the expert store once offloaded
        expert = self.offload.store.template if self.offload else first_expert(self.model)
        cuda = self.device.type == "cuda"
        return plan_model(
            self.model,
            expert,
            kv_bytes,
            budget,
            str(self.device),
            context,
            self.dtype,
            machine=machine,
            max_slots=max_slots,
            fused_int4=cuda and cuda_int4_kernel(self.device),
            mode=mode,
        )

    def set_context(self, context: int) -> None:
        """Change the rolling KV window (the conversation is prefilled again on the next turn).

        With experts offloaded, the placement is planned again for the new KV cache first: a
        window whose cache would take device memory the expert slots hold is refused, with the
        numbers, and nothing changes.
        """
        window = self.config.sliding_window or self.config.max_position_embeddings
        if not 0 < context:
            raise OptionError("the context window must be a positive number of tokens")
        context = min(context, window)
        if self.plan is not None:
            kv = self.cache.nbytes // self.cache.capacity * context
            mode = self.offload.mode if self.offload is not None else "gpu"
            replanned = self._plan(self.plan.budget, None, None, kv, context, mode)
            if sum(replanned.slots) < sum(self.plan.slots):
                raise MemoryBudgetError(
                    f"a context of {context} tokens needs {gib(kv - self.cache.nbytes)} more "
                    "device memory than the expert slots leave; load the model again with this "
                    "--context (fewer slots), or keep a smaller one"
                )
        self.context = context
        self.cache = self.new_cache(self.context, sinks=min(self.sinks, self.context - 1))
        self._cache_ids = []

    def expert_routing(self) -> list[list[int]]:
        """Experts each MoE layer chose for the last token it ran (layers x top_k), read from
        the device in one synchronisation."""
        return self.routing.last_token()

    def resident_experts(self) -> list[set[int]]:
        """Experts held on the device, per MoE layer (all of them unless offloaded)."""
        layers = self.model.moe_layers()
        if self.offload is None:
            return [set(range(self.config.num_local_experts)) for _ in layers]
        return [set(self.offload.cache.resident(i)) for i in range(len(layers))]

    def memory(self) -> dict[str, int]:
        """Bytes in use: host (resident set) and device (allocated, or the plan's on the CPU)."""
        out = {"host": _rss()}
        if self.device.type == "cuda":
            out["device"] = torch.cuda.memory_allocated(self.device)
        elif self.plan is not None:
            out["device"] = self.plan.device_bytes
        return out

    def kernels(self) -> str:
        """Which kernels the quantized matmuls run on ("" for a model without any)."""
        modules = list(self.model.modules())
        if self.offload is not None:  # the experts left the model for the expert store
            modules += self.offload.store.template.modules()
        if not any(isinstance(m, QuantLinear) for m in modules):
            return ""
        if self.device.type != "cpu":
            return describe_device_kernels(modules)
        return describe_cpu_kernels()

    def stats(self) -> OffloadStats | None:
        """Runtime counters: the expert cache's, when the experts are offloaded (else None)."""
        if self.offload is None:
            return None
        return self.offload.stats()

    def complete(self, prompt: str | Sequence[int], **sampling: Any) -> Summary:
        """Run a whole generation and return its Summary."""
        return _summary(self.generate(prompt, **sampling))

    def complete_chat(self, messages: Sequence[dict[str, str]], **sampling: Any) -> Summary:
        """Run a whole chat reply and return its Summary."""
        return _summary(self.chat(messages, **sampling))


def _summary(events: Iterator[Event]) -> Summary:
    """The Summary that ends a stream of events."""
    *_, last = events
    if not isinstance(last, Summary):
        raise RuntimeError("a generation ended without its Summary")
    return last
