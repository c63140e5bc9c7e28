"""Options several commands share, each declared once.

`quantize` and `pull` take the same quantization options; `run`, `chat`, `tui` and `serve`
take the same options for where the model runs (`Where`), and `run`, `chat` and `tui` the same
sampling options (`Sampling`). A group of options is a function
whose parameters are the options and whose value is what a command receives: a command that
declares a parameter `sampling: Sampling` shows the group's options in its place in its help,
and is called with the group's value (`with_groups`).
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, get_args

import typer

from localmix.defaults import (
    DEFAULT_EXPERTS,
    DEFAULT_METHOD,
    DEFAULT_POLICY,
    DEFAULT_PREFETCH,
    QUANT_METHODS,
)

Temperature = Annotated[float | None, typer.Option(help="0 = greedy (default 0.7)")]
TopP = Annotated[float | None, typer.Option("--top-p", help="nucleus sampling mass")]
TopK = Annotated[int | None, typer.Option("--top-k", help="keep the k most likely tokens")]
Seed = Annotated[int | None, typer.Option(help="random seed, for reproducible replies")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="reply length limit")]
Stop = Annotated[list[str] | None, typer.Option(help="stop at this string (repeatable)")]
Context = Annotated[int | None, typer.Option(help="rolling context window, in tokens")]
System = Annotated[str | None, typer.Option(help="system prompt")]
Device = Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when present)")]
DeviceMemory = Annotated[
    str | None,
    typer.Option("--device-memory", help="offload experts to fit this budget, e.g. 12GiB"),
]
Slots = Annotated[int | None, typer.Option(help="offload experts: device slots per layer")]
Policy = Annotated[str, typer.Option(help="expert cache eviction: transition or lru")]
Prefetch = Annotated[int, typer.Option(help="layers of router-driven prefetch (0: off)")]
Experts = Annotated[
    str,
    typer.Option(
        help="where a missed expert runs: gpu (copied in), cpu (computed in host RAM), hybrid "
        "(per miss, the faster) or auto (the fastest predicted for this machine)"
    ),
]
Mmap = Annotated[
    bool | None,
    typer.Option(
        "--mmap/--no-mmap",
        help="CPU weights: --mmap maps the files (faster start, pages the system may drop), "
        "--no-mmap reads them into huge pages (faster decode; the default where they fit)",
    ),
]
Threads = Annotated[
    int | None, typer.Option(help="CPU threads (default: one per physical core, less one)")
]
NoServer = Annotated[
    bool,
    typer.Option("--no-server", help="load the model here even when `localmix serve` runs"),
]
Load = Annotated[str | None, typer.Option(help="continue a saved conversation")]
GroupSize = Annotated[int, typer.Option("--group-size", help="32, 64 or 128")]
Method = Annotated[
    str,
    typer.Option(
        help=f"how scales are chosen: {', '.join(QUANT_METHODS)} (default {DEFAULT_METHOD}; "
        "rtn is fastest)"
    ),
]


@dataclass(frozen=True)
class Placement:
    """Where the model runs, as given on the command line."""

    context: int | None  # tokens; None: the library's default
    threads: int | None  # CPU threads; None: one per physical core, less one
    offload: dict[str, Any]  # `localmix.load` options: device, expert slots, policy...

    @property
    def load_options(self) -> dict[str, Any]:
        """Everything `localmix.load` takes of it (the threads are set apart)."""
        return {"context": self.context, **self.offload}


def placement(
    context: Context = None,
    device: Device = None,
    device_memory: DeviceMemory = None,
    slots: Slots = None,
    policy: Policy = DEFAULT_POLICY,
    prefetch: Prefetch = DEFAULT_PREFETCH,
    experts: Experts = DEFAULT_EXPERTS,
    mmap: Mmap = None,
    threads: Threads = None,
) -> Placement:
    """The placement options of `run`, `chat`, `tui` and `serve`."""
    offload = {
        "device": device,
        "device_memory": device_memory,
        "expert_slots": slots,
        "policy": policy,
        "prefetch": prefetch,
        "experts": experts,
        "mmap": mmap,
    }
    return Placement(context, threads, offload)


def sampling(
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    seed: Seed = None,
    max_tokens: MaxTokens = None,
    stop: Stop = None,
) -> dict[str, Any]:
    """The sampling options given on the command line (SamplingOptions.updated checks them)."""
    given: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    given |= {"seed": seed, "max_tokens": max_tokens, "stop": stop}
    return {k: v for k, v in given.items() if v is not None and v != ()}


@dataclass(frozen=True)
class Group:
    """Marks a command's parameter that stands for the options of `collect`'s parameters."""

    collect: Callable[..., Any]

    @property
    def options(self) -> list[inspect.Parameter]:
        return list(inspect.signature(self.collect).parameters.values())


Where = Annotated[Placement, Group(placement)]
Sampling = Annotated[dict[str, Any], Group(sampling)]


def with_groups(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` as typer should see it: each parameter annotated `Where` or `Sampling` replaced
    by its group's options, and the group's value built from them when the command runs."""
    signature = inspect.signature(command, eval_str=True)
    groups = {p.name: g for p in signature.parameters.values() if (g := group_of(p)) is not None}
    params: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        group = groups.get(p.name)
        params.extend([p] if group is None else [o.replace(kind=p.kind) for o in group.options])

    @functools.wraps(command)
    def wrapper(**given: Any) -> Any:
        for name, group in groups.items():
            given[name] = group.collect(**{o.name: given.pop(o.name) for o in group.options})
        return command(**given)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def group_of(param: inspect.Parameter) -> Group | None:
    """The option group a parameter stands for, if it is annotated `Where` or `Sampling`."""
    return next((m for m in get_args(param.annotation)[1:] if isinstance(m, Group)), None)
