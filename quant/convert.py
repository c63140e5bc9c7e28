"""The offline converter: a Hugging Face Mixtral checkpoint -> localmix's quantized layout.

Reads the source tensor by tensor (memory stays near one expert's weights plus one output
shard), writes one output shard per source shard with each expert's quantized tensors adjacent
(so the offloader moves an expert in one copy), then a manifest (`localmix.json`) with the
format version, the settings, the source files' sizes and hashes, and per-tensor errors.

Atomic and resumable: a shard is written under a temporary name and renamed when complete, and
its hash and the hashes of the source shards it was made from are recorded in
`.localmix-progress.json`; a rerun skips shards whose output and sources are unchanged, and
redoes the others (a source changed in place, with the same sizes, is quantized again). The
manifest, written last, marks the output complete and takes the progress record in (a finished
model has no progress file; a rerun still finds what it needs to skip the work). The source is
only ever read; one conversion at a time writes into a destination (a lock file in it).

`convert` is the list of steps: `plan_conversion` (check everything, refuse before writing),
`resume` (what an earlier run left), `start`, `convert_shard` for each shard, `finish`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .files import (
    LOCK,
    exclusive,
    free_space,
    is_plain_name,
    read_json,
    write_atomic,
    write_json,
)
from .formats import QuantError, quantize_tensor
from .manifest import (
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    QUANTIZED_SIZE_RATIO,
    RESUME_KEY,
    SHAPES_KEY,
    ConvertError,
    Settings,
    check_manifest,
    check_settings,
    is_int,
    is_number,
    is_sha256,
    plan_bits,
    str_map,
)
from .names import EXPERT_WEIGHT_RE, QWEIGHT, SCALES_ZEROS, expert_weights, quantized_base
from .safetensors_io import (
    SafetensorsError,
    SafetensorsFile,
    shard_name,
    weight_map,
    write_file,
    write_index,
)

Progress = Callable[[int, int, str], None]  # (source bytes done, total, what)
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
)


def convert(
    src: str | Path,
    dst: str | Path,
    settings: Settings | None = None,
    progress: Progress | None = None,
) -> dict:
    """Quantize the checkpoint in `src` into `dst` with `settings` (default: `Settings()`);
    returns the manifest.

    `progress(done_bytes, total_bytes, what)` is called as source bytes are processed. Only
    `dst` is written; a second conversion into it waits for the first to finish.
    """
    plan = plan_conversion(Path(src), Path(dst), check_settings(settings or Settings()))
    with exclusive(plan.dst, partial(report_waiting, plan, progress)):
        run = resume(plan)
        finished = finished_manifest(plan, run)
        if finished is not None:
            return finished
        start(plan, run)
        source = SourceTensors(plan.src, plan.weight_map)
        for shard in plan.shards:
            convert_shard(plan, run, source, shard, progress)
        return finish(plan, run)


@dataclass(frozen=True)
class Plan:
    """A conversion, checked before anything is written: what is read and what is written."""

    src: Path
    dst: Path
    settings: Settings
    weight_map: dict[str, str]  # tensor name -> source shard
    shards: list[str]  # the source shards, sorted; one output shard each
    out_names: dict[str, str]  # source shard -> output shard
    tensors: dict[str, list[str]]  # source shard -> the tensors its output holds, in order
    fingerprint: dict
    total: int  # bytes of the source shards


def plan_conversion(src: Path, dst: Path, settings: Settings) -> Plan:
    """Check the source (its config, index and every shard's header), the destination and the
    free space, and work out which tensors go into which output shard: a conversion that cannot
    go ahead is refused here, before anything is written."""
    if src.resolve() == dst.resolve():
        raise ConvertError("the destination must differ from the source")
    if not (src / "config.json").exists():
        raise ConvertError(f"{src}: no config.json; is this a model directory?")
    if (src / MANIFEST).exists():
        raise ConvertError(f"{src} is already a quantized model; convert its source instead")
    weights = source_weight_map(src)
    shards = sorted(set(weights.values()))
    for s in shards:
        open_source(src / s)  # a missing or truncated shard fails here, before any writing
    fp = fingerprint(src, shards, settings)
    total = sum((src / s).stat().st_size for s in shards)
    if not check_destination(dst, fp).get("complete"):  # refuse before writing anything
        check_free_space(dst, int(total * QUANTIZED_SIZE_RATIO))
    return Plan(
        src,
        dst,
        settings,
        weights,
        shards,
        {s: shard_name(i + 1, len(shards)) for i, s in enumerate(shards)},
        output_tensors(src, weights, shards),
        fp,
        total,
    )


def output_tensors(src: Path, weights: dict[str, str], shards: list[str]) -> dict[str, list[str]]:
    """The tensors each output shard holds, by source shard, in the order written. Each expert
    goes with the shard that holds its w1, its three matrices together (so they stay adjacent)."""
    owner = {}
    for name, shard in weights.items():
        m = EXPERT_WEIGHT_RE.match(name)
        if m:
            first = expert_weights(m.group(1))[0]
            if first not in weights:
                raise ConvertError(f"{src}: expert weight '{name}' has no '{first}' beside it")
            owner[m.group(1)] = weights[first]
        else:
            owner[name] = shard
    out: dict[str, list[str]] = {s: [] for s in shards}
    for key in sorted(owner):
        out[owner[key]] += [key] if key in weights else expert_weights(key)
    return out


def report_waiting(plan: Plan, progress: Progress | None) -> None:
    """Tell `progress` that another conversion holds the destination."""
    if progress:
        progress(0, plan.total, f"waiting for another conversion into {plan.dst}")


@dataclass
class Run:
    """A conversion under way, as its progress file records it: the output shards done (by an
    earlier run or this one) and the source shards' digests."""

    fingerprint: dict
    digests: SourceDigests
    done: dict[str, dict]  # output shard -> {"sha256", "size", "source", "reads", ...}
    complete: bool  # an earlier run finished
    processed: int = 0  # source bytes through, this run

    def record(self) -> dict:
        """The progress file's content."""
        return {"fingerprint": self.fingerprint, "sources": self.digests.known, "shards": self.done}


def resume(plan: Plan) -> Run:
    """What an earlier run of the same conversion left in the destination that can be kept
    (read again under the lock: the earlier run may have just finished)."""
    record = check_destination(plan.dst, plan.fingerprint)
    record = check_progress(record, list(plan.out_names.values()), plan.shards) if record else {}
    return Run(
        plan.fingerprint,
        SourceDigests(plan.src, record.get("sources", {})),
        record.get("shards", {}),
        bool(record.get("complete")),
    )


def finished_manifest(plan: Plan, run: Run) -> dict | None:
    """The manifest of a finished conversion whose source shards are unchanged, or None."""
    if (
        run.complete
        and set(run.done) == set(plan.out_names.values())
        and all(run.digests.match(d["reads"]) for d in run.done.values())
    ):
        try:
            return check_manifest(read_json(plan.dst / MANIFEST), plan.dst / MANIFEST)
        except QuantError:
            pass  # written again
    return None


def start(plan: Plan, run: Run) -> None:
    """Mark the destination unfinished: no manifest (not loadable while shards change), no
    temporary file of a run that was killed, a progress file."""
    (plan.dst / MANIFEST).unlink(missing_ok=True)
    for stale in plan.dst.glob(".*.tmp"):
        stale.unlink()
    write_json(plan.dst / PROGRESS, run.record())


class SourceTensors:
    """The source checkpoint's tensors by name, each checked finite; a shard is opened when
    first read."""

    def __init__(self, src: Path, weights: dict[str, str]) -> None:
        self.src = src
        self.weights = weights
        self.files: dict[str, SafetensorsFile] = {}

    def get(self, name: str) -> torch.Tensor:
        shard = self.weights.get(name)
        if shard is None:
            raise ConvertError(f"{self.src}: tensor '{name}' is missing from the checkpoint")
        if shard not in self.files:
            self.files[shard] = open_source(self.src / shard)
        f = self.files[shard]
        if name not in f.infos:
            raise ConvertError(f"{f.path}: cannot read tensor '{name}' (the index puts it here)")
        try:
            w = f.get(name)
        except ValueError as e:  # the file shrank since its header was read
            raise ConvertError(f"{f.path}: cannot read tensor '{name}' ({e})") from e
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise ConvertError(
                f"{f.path}: tensor '{name}' holds NaN or infinite values; the "
                "checkpoint is broken, refusing to quantize it"
            )
        return w


def convert_shard(
    plan: Plan, run: Run, source: SourceTensors, shard: str, progress: Progress | None
) -> None:
    """Quantize and write the output shard made from source `shard` and record it in the
    progress file, unless an earlier run wrote it from the same source bytes."""
    out_name = plan.out_names[shard]
    out = plan.dst / out_name
    run.processed += (plan.src / shard).stat().st_size
    previous = run.done.get(out_name)
    if (
        previous
        and run.digests.match(previous["reads"])
        and out.is_file()
        and sha256(out) == previous["sha256"]
    ):
        if progress:
            progress(run.processed, plan.total, f"{out_name} (already done)")
        return
    names = plan.tensors[shard]
    reads = sorted({plan.weight_map.get(n, shard) for n in names} | {shard})
    before = {s: run.digests.identity(s) for s in reads}  # the files must not change meanwhile
    tensors, errors, shapes = quantize_tensors(names, source, plan.settings)
    read = {s: run.digests.digest(s) for s in reads}  # hashed while still in the page cache
    if any(read[s]["identity"] != before[s] for s in reads):
        raise ConvertError(f"{plan.src} changed while it was read; run the same command again")
    metadata = {
        "format": "pt",
        "localmix": str(FORMAT_VERSION),
        SHAPES_KEY: json.dumps(shapes, sort_keys=True),
    }
    write_atomic(out, partial(write_file, tensors=tensors, metadata=metadata))
    run.done[out_name] = {
        "sha256": sha256(out),
        "size": out.stat().st_size,
        "source": shard,
        "reads": {s: read[s]["sha256"] for s in reads},
        "errors": errors,
        "tensors": sorted(tensors),
    }
    write_json(plan.dst / PROGRESS, run.record())
    if progress:
        progress(run.processed, plan.total, out_name)


def quantize_tensors(
    names: list[str], source: SourceTensors, settings: Settings
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, list[int]]]:
    """An output shard's tensors, in the order of `names`: each weight `plan_bits` quantizes as
    `NAME.qweight` and `NAME.scales_zeros`, the others as they are; with each quantized
    weight's relative error and logical shape."""
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    shapes: dict[str, list[int]] = {}
    for name in names:
        w = source.get(name)
        bits = plan_bits(name, settings)
        if bits:
            q = quantize_tensor(
                w, bits=bits, group_size=settings.group_size, method=settings.method
            )
            base = quantized_base(name)
            tensors[base + QWEIGHT] = q.qweight
            tensors[base + SCALES_ZEROS] = q.scales_zeros
            assert q.error is not None  # quantize_tensor measures it
            errors[name] = q.error
            shapes[base] = list(q.shape)
        else:
            tensors[name] = w.contiguous()
    return tensors, errors, shapes


def finish(plan: Plan, run: Run) -> dict:
    """Copy the source's config and tokenizer files, write the index and the manifest (the
    mark of a finished model) and remove the progress file; returns the manifest."""
    src, dst = plan.src, plan.dst
    for name in COPIED_FILES:
        if (src / name).exists():
            write_atomic(dst / name, partial(shutil.copyfile, src / name))
    manifest = make_manifest(plan, run)
    weights = {t: n for n, d in sorted(run.done.items()) for t in d["tensors"]}
    write_index(dst, weights, {"format": "localmix"})
    # A finished model keeps no progress file: what a rerun checks to skip the work (the
    # sources' identities and what each shard read) goes into the manifest.
    write_json(dst / MANIFEST, {**manifest, RESUME_KEY: {**run.record(), "complete": True}})
    (dst / PROGRESS).unlink(missing_ok=True)
    return manifest


def make_manifest(plan: Plan, run: Run) -> dict:
    """The manifest of the finished conversion: format, settings, source files, output shards
    and the quantization errors."""
    errors = {k: v for d in run.done.values() for k, v in d["errors"].items()}
    expert_errors = [v for k, v in errors.items() if EXPERT_WEIGHT_RE.match(k)]
    return {
        "format": "localmix",
        "format_version": FORMAT_VERSION,
        "quantization": plan.settings.to_dict(),
        "fingerprint": plan.fingerprint,
        "source": {
            "path": str(plan.src),
            "files": {
                s: {"size": d["identity"][2], "sha256": d["sha256"]}
                for s, d in sorted(run.digests.known.items())
                if s in plan.shards
            },
        },
        "shards": {
            n: {"size": d["size"], "sha256": d["sha256"]} for n, d in sorted(run.done.items())
        },
        "error_summary": {
            "expert_mean_relative_error": sum(expert_errors) / max(len(expert_errors), 1),
            "expert_worst_relative_error": max(expert_errors, default=0.0),
            "tensors": len(errors),
        },
        "errors": errors,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def source_weight_map(src: Path) -> dict[str, str]:
    """Tensor name -> source shard (`safetensors_io.weight_map`), a shard that cannot be read a
    ConvertError."""
    try:
        return weight_map(src)
    except SafetensorsError as e:
        raise unreadable(e) from e


def open_source(path: Path) -> SafetensorsFile:
    """A source shard, its header checked; a missing, truncated or corrupt one is a
    ConvertError."""
    if not path.exists():
        raise ConvertError(f"{path}: missing source shard; download the model again")
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise unreadable(e) from e


def unreadable(e: SafetensorsError) -> ConvertError:
    return ConvertError(f"{e.path}: corrupt or truncated safetensors file ({e.reason})")


def check_free_space(dst: Path, needed: int) -> None:
    probe, free = free_space(dst)
    if free < needed:
        raise ConvertError(
            f"not enough disk space in {probe}: the quantized model needs about "
            f"{needed / 1e9:.1f} GB, {free / 1e9:.1f} GB are free"
        )


def fingerprint(src: Path, shards: list[str], settings: Settings) -> dict:
    """What identifies a conversion: the source's config, file names and sizes, and the
    settings. The shards' content is checked on top of it, shard by shard (`SourceDigests`)."""
    config = (src / "config.json").read_bytes() if (src / "config.json").exists() else b""
    return {
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "source_files": {s: (src / s).stat().st_size for s in shards},
        "settings": settings.to_dict(),
    }


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class SourceDigests:
    """The sha256 of each source shard, computed at most once a run, and kept with the identity
    of the file it was taken of (device, inode, size, modification and change times): a shard
    whose identity is unchanged since holds the same bytes, any other is hashed again."""

    def __init__(self, src: Path, known: dict[str, dict]) -> None:
        self.src = src
        self.known = dict(known)  # shard -> {"sha256", "identity"}, from earlier runs too

    def identity(self, shard: str) -> list[int]:
        s = os.stat(self.src / shard)
        return [s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]

    def digest(self, shard: str) -> dict:
        """{"sha256", "identity"} of the shard as it is now."""
        now = self.identity(shard)
        known = self.known.get(shard)
        if known and known["identity"] == now:
            return known
        entry = {"sha256": sha256(self.src / shard), "identity": now}
        if self.identity(shard) != now:
            raise ConvertError(
                f"{self.src / shard} changed while it was read; run the same command again"
            )
        self.known[shard] = entry
        return entry

    def match(self, reads: dict[str, str]) -> bool:
        """Whether each source shard holds the bytes it held when an output was made of it
        (`reads`: shard -> sha256)."""
        return all(self.digest(s)["sha256"] == h for s, h in reads.items())


def _valid_shard_record(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and is_sha256(entry.get("sha256"))
        and is_int(entry.get("size"))
        and str_map(entry.get("reads"), is_sha256)
        and all(is_plain_name(s) for s in entry["reads"])
        and str_map(entry.get("errors"), is_number)
        and isinstance(entry.get("tensors"), list)
        and all(isinstance(t, str) for t in entry["tensors"])
    )


def _valid_source_record(entry: object) -> bool:
    identity = entry.get("identity") if isinstance(entry, dict) else None
    return (
        is_sha256(entry.get("sha256") if isinstance(entry, dict) else None)
        and isinstance(identity, list)
        and len(identity) == 5
        and all(is_int(i) for i in identity)
    )


def check_progress(record: dict, out_names: list[str], shards: list[str]) -> dict:
    """An earlier run's progress record for this conversion, keeping only well-formed entries
    of this conversion's shards: anything else is done again."""
    done = record.get("shards")
    done = done if isinstance(done, dict) else {}
    sources = record.get("sources")
    sources = sources if isinstance(sources, dict) else {}
    return {
        "fingerprint": record["fingerprint"],
        "sources": {s: e for s, e in sources.items() if s in shards and _valid_source_record(e)},
        "shards": {
            n: e
            for n, e in done.items()
            if n in out_names and _valid_shard_record(e) and set(e["reads"]) <= set(shards)
        },
        "complete": record.get("complete") is True,
    }


def check_destination(dst: Path, fp: dict) -> dict:
    """The record of an earlier run of the same conversion, or {}; refuses a directory that
    holds anything else."""
    if not dst.exists():
        return {}
    if not dst.is_dir():
        raise ConvertError(f"{dst} is not a directory; choose another destination")
    if all(p.name == LOCK for p in dst.iterdir()):
        return {}
    for marker in (PROGRESS, MANIFEST):
        path = dst / marker
        if path.exists():
            try:
                record = read_json(path)
            except QuantError:
                continue
            if isinstance(record, dict) and record.get("fingerprint") == fp:
                resume = record.get(RESUME_KEY)  # a finished model's manifest
                if isinstance(resume, dict) and resume.get("fingerprint") == fp:
                    return resume
                return record
            raise ConvertError(
                f"{dst} holds a different model or settings; choose another destination "
                "or delete it first"
            )
    raise ConvertError(
        f"{dst} is not empty and is not a localmix conversion; refusing to write there"
    )
