"""`localmix` commands. Errors a user can cause print one line on stderr and exit 1."""

import contextlib
import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from localmix.cli import EXIT_INTERRUPTED, command_started
from localmix.cli.help import HelpGroup
from localmix.cli.options import (
    GroupSize,
    Load,
    Method,
    NoServer,
    Placement,
    Sampling,
    System,
    Where,
    with_groups,
)
from localmix.cli.render import (
    err,
    os_error_line,
    prefill_progress,
    print_stats,
)
from localmix.cli.serve import serve
from rich.console import Console
from rich.table import Table

from localmix.defaults import DEFAULT_GROUP_SIZE, DEFAULT_METHOD, DEFAULT_POLICY
from localmix.errors import LocalmixError
from localmix.units import human_bytes

if TYPE_CHECKING:
    from localmix.engine import Engine
    from localmix.events import ChatEngine

app = typer.Typer(
    name="localmix",
    cls=HelpGroup,
    help='Run Mixtral-style MoE models locally. Start with: localmix run demo "Hello"',
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"localmix {version('localmix')}")
        except PackageNotFoundError:
            print("localmix (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _main(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="print the version"
        ),
    ] = False,
) -> None:
    """Run Mixtral-style MoE models locally. Start with: localmix run demo 'Hello'."""


EXIT_USER_ERROR = 1
# Piped text kept per token of context: more than any token's bytes, so cutting to this loses
# only text that would roll out of the context window before the reply.
STDIN_BYTES_PER_TOKEN = 16


def friendly_errors(command: Callable) -> Callable:
    """The commands' error barrier: an error a user can cause (ours, or the system's: a full
    disk, a closed pipe) prints one line on stderr and exits 1; Ctrl+C exits 130. A bug in
    localmix still shows its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        command_started()
        try:
            return command(*args, **kwargs)
        except LocalmixError as e:
            raise fail(str(e)) from None
        except OSError as e:
            drop_unwritable_stdout()
            raise fail(os_error_line(e)) from None
        except KeyboardInterrupt:
            err.print("[dim]interrupted[/dim]")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def drop_unwritable_stdout() -> None:
    """After stdout failed (a full disk, a closed pipe), send what is left of it nowhere, so
    that the exit does not fail again on the text still buffered."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())


def fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(EXIT_USER_ERROR)


def load_engine(model: str | None, where: Placement, sampling: dict[str, Any]) -> "Engine":
    """`localmix.load`, which checks every option before it reads anything, with a spinner;
    the CPU threads are set first."""
    from localmix.cli import import_runtime

    import_runtime()  # PyTorch, with Ctrl+C exiting at once while it loads
    import localmix
    from localmix.demo import builtin_note
    from localmix.store import BUILTIN
    from localmix.threads import set_threads
    from localmix.workflows import default_model

    set_threads(where.threads)
    name = model or default_model()
    with err.status(f"loading {name}…") if err.is_terminal else contextlib.nullcontext() as status:

        def filling(done: int, total: int) -> None:  # experts copied into host RAM
            if status is not None:
                status.update(f"loading {name}: experts into host RAM {done}/{total}")

        engine = localmix.load(name, progress=filling, **where.load_options, **sampling)
    context = where.context
    if context is not None and engine.context < context:
        err.print(
            f"[yellow]note:[/yellow] {name} attends to at most {engine.context} tokens; the "
            f"context is {engine.context}, not {context}: older text falls out of it"
        )
    if name in BUILTIN:
        err.print(f"[dim]{builtin_note()}[/dim]")
    return engine


@app.command()
@friendly_errors
@with_groups
def run(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="model name or path")] = None,
    prompt: Annotated[str | None, typer.Argument(help="prompt; piped stdin goes before it")] = None,
    system: System = None,
    *,
    sampling: Sampling,
    where: Where,
    raw: Annotated[bool, typer.Option(help="no chat template: continue the text")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="timings on stderr")] = False,
    cont: Annotated[
        bool, typer.Option("--continue", "-c", help="continue the last conversation")
    ] = False,
    conversation: Annotated[
        str | None,
        typer.Option("--conversation", help="continue this saved conversation (or start it)"),
    ] = None,
    no_server: NoServer = False,
) -> None:
    """Answer one prompt and exit: for scripts and pipelines (`cat f | localmix run M "Sum up:"`).

    Only the reply goes to stdout; everything else goes to stderr. A chat (not --raw) is saved
    as a conversation that `-c` or `--conversation NAME` continues.
    """
    from localmix.cli.client import RemoteEngine, connect, given_options

    from localmix.workflows import is_model

    server = connect(given_options(ctx), no_server)
    known = server.has_model if server is not None else is_model
    piped = not sys.stdin.isatty()
    if model is not None and prompt is None and not known(model):
        model, prompt = None, model  # `localmix run "Hello"`: a prompt for the default model
    if not piped and not prompt:
        raise fail("no prompt: give one as an argument or on stdin")
    if raw and system:
        raise fail("--system needs the chat template; drop --raw")
    if raw and (cont or conversation):
        raise fail("--continue and --conversation need the chat template; drop --raw")
    if cont and conversation:
        raise fail("give --continue or --conversation NAME, not both")
    resumed = continued(cont, conversation)  # a bad name or file is refused before loading
    engine: Engine | RemoteEngine
    if server is not None:  # the model is loaded there already
        engine = RemoteEngine(server, model, sampling)
    else:
        engine = load_engine(model, where, sampling)
    parts = []
    if piped:
        text = read_stdin(STDIN_BYTES_PER_TOKEN * engine.context, engine.context)
        if text.strip():
            parts.append(text.rstrip("\n"))
    if prompt:
        parts.append(prompt)
    if not parts:
        raise fail("no prompt: give one as an argument or on stdin")
    text = "\n\n".join(parts)
    if verbose and engine.plan is not None:
        err.print(f"[dim]{engine.plan}[/dim]")
        err.print(f"[dim]{engine.experts_report()}[/dim]")
    if verbose:
        from localmix.threads import describe as describe_threads

        kernels = engine.kernels()
        if kernels:
            err.print(f"[dim]quantized matmuls: {kernels}[/dim]")
        err.print(f"[dim]CPU: {describe_threads()}[/dim]")
    progress = prefill_progress(err) if verbose or err.is_terminal else None
    if raw:
        events = engine.generate(text, progress=progress)
    else:
        from localmix.session import ChatSession

        session = ChatSession(
            engine, resumed, on_save_problem=lambda p: err.print(f"not saved: {p}")
        )
        if system is not None:
            session.system = system
        events = session.send(text, progress=progress)
    from localmix.events import Summary, TokenEvent

    summary: Summary | None = None
    out = sys.stdout
    try:
        for event in events:
            if isinstance(event, TokenEvent):
                if not as_json and event.text:
                    out.write(event.text)
                    out.flush()
            else:
                summary = event
    except KeyboardInterrupt:
        events.close()
        if not as_json:
            out.write("\n")
        err.print("[dim]interrupted[/dim]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if summary is None:  # every stream ends in its Summary
        raise RuntimeError("the reply ended without its summary")
    if as_json:
        import json

        json.dump(summary.to_dict(), out, ensure_ascii=False)
        out.write("\n")
    else:
        out.write("\n")
    say_context_cut(summary)
    if verbose:
        print_stats(summary)


def continued(cont: bool, name: str | None):
    """The saved conversation `run` goes on with (`-c`: the last one; `--conversation NAME`:
    that one, or a new one of that name), or None for a new chat."""
    from localmix.conversations import (
        Conversation,
        check_name,
        conversation_path,
        latest_conversation,
    )

    if cont:
        return latest_conversation()
    if name is None:
        return None
    check_name(name)
    if conversation_path(name).exists():
        return Conversation.load(name)
    return Conversation(name=name, model="")


def say_context_cut(summary) -> None:
    """A note on stderr when the prompt was longer than the context window."""
    from localmix.session import context_note

    note = context_note(summary)
    if note:
        err.print(f"[yellow]note:[/yellow] {note}")


def read_stdin(limit: int, context: int) -> str:
    """Piped text, of which at most the last `limit` bytes are kept (a notice on stderr says
    what was cut): only the last `context` tokens of a prompt can reach the reply anyway.
    Bytes that are not UTF-8 become U+FFFD."""
    stream = sys.stdin.buffer
    tail, total = bytearray(), 0
    while chunk := stream.read(1 << 20):
        total += len(chunk)
        tail += chunk
        del tail[:-limit]
    if total > limit:
        while tail and tail[0] & 0xC0 == 0x80:  # not the middle of a character
            del tail[0]
        err.print(
            f"[yellow]note:[/yellow] stdin held {human_bytes(total)}; only its last "
            f"{human_bytes(len(tail))} are used (the context holds {context} tokens, and only "
            "the last tokens can reach the reply)"
        )
    return tail.decode("utf-8", "replace")


@app.command("list")
@friendly_errors
def list_cmd() -> None:
    """Models in the store."""
    from datetime import datetime

    from localmix.demo import builtin_model
    from localmix.store import dir_size, list_models, model_format, models_dir
    from localmix.workflows import PULL_HINT

    models = list_models()
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "SIZE", "FORMAT", "MODIFIED"):
        table.add_column(col)
    demo = builtin_model(models_dir())  # always there: shipped in the package
    table.add_row("demo", human_bytes(dir_size(demo)), model_format(demo), "built in")
    for m in models:
        modified = datetime.fromtimestamp(m["modified"]).strftime("%Y-%m-%d %H:%M")
        table.add_row(str(m["name"]), human_bytes(m["size"]), str(m["format"]), modified)
    Console(highlight=False).print(table)
    if not models:
        err.print(f"no models in {models_dir()} yet: `{PULL_HINT}`")


@app.command()
@friendly_errors
def show(model: Annotated[str, typer.Argument(help="model name or path")]) -> None:
    """Architecture, parameters, format and files of a model."""
    from localmix.config import ModelConfig
    from localmix.loader import check_config
    from localmix.store import model_format, resolve

    name, path = resolve(model)
    cfg = ModelConfig.from_file(path)
    check_config(cfg, path)
    counts = cfg.param_counts()
    out = Console(highlight=False)
    out.print(f"[bold]{name}[/bold]  ({path})")
    rows = [
        (
            "architecture",
            f"{cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}",
        ),
        (
            "attention",
            f"{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV), head_dim {cfg.head_dim}, "
            f"window {cfg.sliding_window or 'none'}",
        ),
        (
            "parameters",
            f"{counts['total'] / 1e9:.3f}B total, {counts['active'] / 1e9:.3f}B active per token",
        ),
        ("format", model_format(path)),
        ("vocabulary", str(cfg.vocab_size)),
    ]
    if cfg.is_moe:
        rows.insert(
            2,
            (
                "experts",
                f"{cfg.num_local_experts} per layer, top-{cfg.num_experts_per_tok}, "
                f"{counts['experts'] / counts['total']:.0%} of parameters",
            ),
        )
    for key, value in rows:
        out.print(f"  {key:<13}{value}")
    out.print("  files")
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        out.print(f"    {f.name:<40}{human_bytes(f.stat().st_size):>10}")
    if cfg.is_moe:
        from localmix.workflows import placement_here

        first, *rest = placement_here(cfg, path).splitlines()
        out.print(f"  {'placement':<13}{first}")
        for line in rest:
            out.print(f"  {'':<13}{line}")
    if model_format(path).startswith("q"):  # quantized: which kernels would multiply it here
        from localmix.quant.kernels import describe as describe_kernels

        out.print(f"  {'CPU kernels':<13}{describe_kernels()}")


@app.command()
@friendly_errors
def rm(model: Annotated[str, typer.Argument(help="model name in the store")]) -> None:
    """Delete a model from the store."""
    from localmix.hub import repo_folder
    from localmix.store import dir_size, remove

    path = remove(model)
    err.print(f"deleted {model}")
    download = repo_folder(path.name.replace("--", "/", 1))
    if "--" in path.name and download.is_dir():  # what `pull` downloaded stays in HF's cache
        err.print(
            f"the original download is still in the Hugging Face cache: {download} "
            f"({human_bytes(dir_size(download))}); delete it with `rm -r {download}` "
            "or `huggingface-cli delete-cache`"
        )


@app.command()
@friendly_errors
@with_groups
def chat(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="model name or path")] = None,
    system: System = None,
    *,
    sampling: Sampling,
    where: Where,
    load: Load = None,
    use_tui: Annotated[
        bool, typer.Option("--tui", help="open the full-screen app instead")
    ] = False,
    no_server: NoServer = False,
) -> None:
    """Chat in the terminal, replies streaming as they are written. /help inside lists commands."""
    from localmix.cli.client import RemoteEngine, connect, given_options

    if not sys.stdin.isatty():
        raise fail("chat needs a terminal; for pipes and scripts use `localmix run MODEL PROMPT`")
    if load is not None:  # a bad name or file is refused before the model loads
        from localmix.conversations import Conversation

        Conversation.load(load)
    if use_tui:  # always in-process: the TUI shows the engine's internals
        from localmix.tui.app import LocalmixApp, typed_ahead

        loaded = load_engine(model, where, sampling)
        app = LocalmixApp(loaded, settings=sampling, system=system, load=load, typed=typed_ahead())
        app.run()
        if app.return_code:
            raise typer.Exit(app.return_code)
        return
    server = connect(given_options(ctx), no_server)
    engine: ChatEngine
    if server is not None:  # the model is loaded there already
        engine = RemoteEngine(server, model, sampling)
    else:
        engine = load_engine(model, where, sampling)
    from localmix.cli.chat import repl

    with contextlib.suppress(AttributeError, ValueError):
        sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]  # kept, mis-encoded
    repl(engine, Console(highlight=False), err, sampling, system, load)


@app.command()
@friendly_errors
def quantize(
    src: Annotated[str, typer.Argument(help="model directory (Hugging Face layout) or name")],
    dst: Annotated[Path, typer.Argument(help="output directory")],
    group_size: GroupSize = DEFAULT_GROUP_SIZE,
    method: Method = DEFAULT_METHOD,
    attn: Annotated[
        str | None, typer.Option(help="attention weights: bf16, int8 or int4 (default int8)")
    ] = None,
    lm_head: Annotated[
        str | None,
        typer.Option("--lm-head", help="output head: bf16, int8 or int4 (default int8)"),
    ] = None,
) -> None:
    """Quantize a checkpoint's experts to 4 bits (resumable: rerun after an interruption)."""
    from localmix.store import resolve
    from localmix.workflows import quant_settings, quantize_model

    settings = quant_settings(group_size, method, attn, lm_head)
    _, path = resolve(src)
    with conversion_bar() as report:
        manifest = quantize_model(path, dst, settings, report)
    err.print(f"wrote {dst}")
    print_quality(manifest)


@contextlib.contextmanager
def conversion_bar():
    """A progress bar (bytes, speed, ETA) on stderr, and the converter's `progress` for it."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = [
        TextColumn("quantizing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    ]
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("", total=None)

        def report(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield report


def print_quality(manifest: dict) -> None:
    s = manifest["error_summary"]
    q = manifest["quantization"]
    err.print(
        f"experts: 4-bit g{q['group_size']} ({q['method']}), relative error mean "
        f"{s['expert_mean_relative_error']:.4f}, worst {s['expert_worst_relative_error']:.4f}"
    )


@app.command("bench-cache")
@friendly_errors
def bench_cache(
    trace: Annotated[Path, typer.Option(help="routing trace (JSON lines)")],
    slots: Annotated[int, typer.Option(help="expert slots per layer")],
    policy: Annotated[str, typer.Option(help="transition (default), lru or belady")] = (
        DEFAULT_POLICY
    ),
    predictor: Annotated[
        str | None,
        typer.Option(help="prefetch from the trace: cross-layer (layer L's experts predict L+1)"),
    ] = None,
    group_size: Annotated[
        int, typer.Option("--group-size", help="expert format: 4-bit g32/64/128")
    ] = DEFAULT_GROUP_SIZE,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """Replay a routing trace through the expert cache: hit rate, loads and bytes per token."""
    from localmix.expert_cache import POLICIES
    from localmix.trace import MIXTRAL_EXPERT_PARAMS, PREDICTORS, read_trace, replay
    from localmix.workflows import quantized_bytes

    if policy not in (*POLICIES, "belady"):
        raise fail(f"unknown policy '{policy}'; use {', '.join((*POLICIES, 'belady'))}")
    if predictor is not None and predictor not in PREDICTORS:
        raise fail(f"unknown predictor '{predictor}'; use {', '.join(PREDICTORS)}")
    data, n_layers, n_experts = read_trace(trace)
    if not 1 <= slots <= n_experts:
        raise fail(f"--slots must be between 1 and {n_experts}")
    expert_bytes = quantized_bytes(MIXTRAL_EXPERT_PARAMS, group_size)
    result = replay(data, n_layers, slots, policy, predictor, expert_bytes)
    optimum = replay(data, n_layers, slots, "belady", None, expert_bytes)
    if as_json:
        import json

        report = {
            **result.to_dict(),
            "policy": policy,
            "predictor": predictor,
            "slots": slots,
            "belady_hit_rate": optimum.hit_rate,
            "expert_bytes": expert_bytes,
        }
        print(json.dumps(report))
        return
    out = Console(highlight=False)
    out.print(
        f"{trace.name}: {result.tokens} tokens, {n_layers} layers, {n_experts} experts; "
        f"{slots} slots per layer; policy {policy}, prefetch {predictor or 'off'}"
    )
    out.print(
        f"  hit rate          {result.hit_rate:.3f}   (offline optimum {optimum.hit_rate:.3f})"
    )
    out.print(f"  loads per token   {result.loads_per_token:.2f}")
    out.print(
        f"  bytes per token   {human_bytes(result.bytes_per_token)}   "
        f"(Mixtral-8x7B expert, 4-bit g{group_size}: {human_bytes(expert_bytes)})"
    )
    if result.prefetch_precision is not None:
        out.print(f"  prefetch precision {result.prefetch_precision:.3f}")


@app.command()
@friendly_errors
def pull(
    ref: Annotated[str, typer.Argument(help=r"Hub repository: org/name\[@revision]")],
    no_quantize: Annotated[
        bool, typer.Option("--no-quantize", help="keep the weights as published")
    ] = False,
    group_size: GroupSize = DEFAULT_GROUP_SIZE,
    method: Method = DEFAULT_METHOD,
) -> None:
    """Download a model from the Hugging Face Hub and quantize it into the store, resumably."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from localmix.store import model_format
    from localmix.workflows import pull_model, quant_settings

    settings = None if no_quantize else quant_settings(group_size, method)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err) as bar:
        tasks: dict[str, TaskID] = {}

        def download(name: str, done: int, size: int) -> None:
            if name not in tasks:  # a file's first report: where it starts
                resumed = 0 < done < size
                label = f"{name} (resuming at {human_bytes(done)})" if resumed else name
                # the bytes already there are not counted in the speed: they start the bar
                tasks[name] = bar.add_task(label, total=size, completed=done)
            bar.update(tasks[name], completed=done)

        def quantizing(done: int, total: int, what: str) -> None:
            if "quantizing" not in tasks:
                tasks["quantizing"] = bar.add_task("quantizing", total=total)
            bar.update(tasks["quantizing"], completed=done, total=total)

        pulled = pull_model(ref, settings, download=download, quantizing=quantizing)
    repo, dst = pulled.repo, pulled.path
    if pulled.manifest is None:
        err.print(f"pulled {repo} ({model_format(dst)}, not quantized) into {dst}")
    else:
        print_quality(pulled.manifest)
        err.print(f"pulled and quantized {repo} into {dst}")
    err.print(f'run it with: localmix run {repo} "Hello"  or  localmix chat {repo}')


def tui(**options) -> None:
    """The full-screen chat app: saved conversations, settings, live expert-cache view
    (`localmix chat --tui`, with the same options)."""
    chat(**options, use_tui=True)


# `tui` takes chat's options (all but --tui), so that the two cannot drift apart.
_chat_options = inspect.signature(chat, eval_str=True)
tui.__signature__ = _chat_options.replace(  # type: ignore[attr-defined]  # read by typer
    parameters=[p for p in _chat_options.parameters.values() if p.name != "use_tui"]
)
tui.__annotations__ = {k: v for k, v in chat.__annotations__.items() if k != "use_tui"}
app.command()(friendly_errors(tui))


conversations_app = typer.Typer(
    help="Saved conversations: list (the default), show, rename, rm.", no_args_is_help=False
)
app.add_typer(conversations_app, name="conversations")


@conversations_app.callback(invoke_without_command=True)
def conversations(ctx: typer.Context) -> None:
    """Saved conversations: list (the default), show, rename, rm."""
    if ctx.invoked_subcommand is None:
        conversations_list()


@conversations_app.command("list")
@friendly_errors
def conversations_list() -> None:
    """Saved conversations, newest first: name, date, messages, first words."""
    from localmix.cli.chat import conversation_lines

    from localmix.conversations import conversations_dir, list_conversations

    found, problems = list_conversations()
    for problem in problems:
        err.print(f"[yellow]{problem}[/yellow]", markup=False)
    for line in conversation_lines(found):
        print(line)
    if not found:
        err.print(f"no saved conversations in {conversations_dir()}")


@conversations_app.command("show")
@friendly_errors
def conversations_show(name: Annotated[str, typer.Argument(help="conversation name")]) -> None:
    """A saved conversation, message by message."""
    from localmix.cli.chat import print_conversation

    from localmix.conversations import Conversation

    print_conversation(Conversation.load(name), Console(highlight=False), err)


@conversations_app.command("rename")
@friendly_errors
def conversations_rename(
    old: Annotated[str, typer.Argument(help="conversation name")],
    new: Annotated[str, typer.Argument(help="its new name")],
    force: Annotated[bool, typer.Option(help="replace a conversation named NEW")] = False,
) -> None:
    """Give a saved conversation another name."""
    from localmix.conversations import rename_conversation

    path = rename_conversation(old, new, force=force)
    err.print(f"renamed {old} to {new} ({path})")


@conversations_app.command("rm")
@friendly_errors
def conversations_rm(name: Annotated[str, typer.Argument(help="conversation name")]) -> None:
    """Delete a saved conversation."""
    from localmix.conversations import delete_conversation

    path = delete_conversation(name)
    err.print(f"deleted {name} ({path})")


@app.command("export")
@friendly_errors
def export_cmd(
    model: Annotated[str, typer.Argument(help="a localmix-quantized model: name or path")],
    dst: Annotated[Path, typer.Argument(help="output directory (new, or empty)")],
    fmt: Annotated[
        str, typer.Option("--format", help="checkpoint format: compressed-tensors (vLLM)")
    ] = "compressed-tensors",
) -> None:
    """Write a quantized model in a format vLLM serves across GPUs and machines."""
    from localmix.quant.export import export
    from localmix.quant.formats import QuantError

    from localmix.store import resolve

    _, path = resolve(model)
    try:
        record = export(path, dst, fmt)
    except QuantError as e:
        raise LocalmixError(str(e)) from e
    change = record["expert_change"]
    err.print(f"wrote {dst}: {record['format']}, {record['layout']}")
    err.print(
        f"integer zero points moved the experts by {change['mean_relative']:.4f} of their norm "
        f"on average (worst {change['worst_relative']:.4f})"
    )
    err.print(f"serve it with: vllm serve {dst} --tensor-parallel-size 2")


app.command()(friendly_errors(serve))
