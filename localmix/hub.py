"""Downloads from the Hugging Face Hub: only the files a model needs, resumable with HTTP Range.

The only module that talks to the network. Files land in the standard Hugging Face cache
(`HF_HOME` / `HF_HUB_CACHE` respected): `blobs/<etag>`, linked from `snapshots/<commit>/`, and
`refs/<revision>`. A half-downloaded blob is kept as `<etag>.incomplete` and continued with a
Range request by the next pull (recent huggingface-hub releases no longer resume across
processes by themselves).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DiskSpaceError, HubError
from .quant.files import exclusive, free_space, is_plain_name
from .quant.formats import QuantError
from .quant.manifest import QUANTIZED_SIZE_RATIO
from .quant.safetensors_io import INDEX, SUFFIX, UNSAFE_SUFFIXES

WANTED = (
    "config.json",
    "generation_config.json",
    f"*{SUFFIX}",
    INDEX,
    "tokenizer.model",
    "tokenizer_config.json",  # small; without a chat_template it marks a base model
)
CHUNK = 1 << 16

Progress = Callable[[str, int, int], None]  # (file, bytes done, file size)
REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
COMMIT = re.compile(r"[0-9a-f]{40}")
ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a git blob's sha1 or an LFS file's sha256


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int


def parse_ref(ref: str) -> tuple[str, str]:
    """`org/name[@revision]` -> (repo id, revision), both checked: they become names of
    directories and files in the cache and the store."""
    repo, _, revision = ref.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(
        REPO_PART.fullmatch(p) and ".." not in p and "--" not in p for p in parts
    ):
        raise HubError(f"'{ref}' is not a Hub repository id; write it as org/name[@revision]")
    revision = revision or "main"
    if not is_plain_name(revision.replace("/", "--")) or ".." in revision:
        raise HubError(f"'{ref}': '{revision}' is not a revision (a branch, tag or commit)")
    return repo, revision


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def repo_folder(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def wanted(name: str) -> bool:
    """Whether a file of a Hub repository is one `pull` downloads (never a pickle)."""
    base = name.rsplit("/", 1)[-1]
    if not is_plain_name(name) or pickled(base):
        return False
    return any(fnmatch.fnmatch(base, p) for p in WANTED)


def pickled(name: str) -> bool:
    """Whether a file is a pickle checkpoint, which localmix never loads (the safetensors
    reader's list)."""
    return name.endswith(UNSAFE_SUFFIXES)


def explain(error: Exception, repo: str) -> HubError:
    """One line that says what to do, for each way the Hub can say no."""
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return HubError(
            f"{repo} is gated: accept its terms on the Hub, then set HF_TOKEN "
            "to a token of that account"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        hint = "" if token() else " (if it is private or gated, set HF_TOKEN)"
        return HubError(f"no repository {repo} on the Hub{hint}")
    if isinstance(error, errors.RevisionNotFoundError):
        return HubError(f"{repo} has no such revision; check the part after @")
    if isinstance(error, errors.HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        if status == 401:
            return HubError(f"{repo} needs authentication: set HF_TOKEN to a Hub access token")
        if status == 403:
            return HubError(f"{repo}: access denied for this token; check HF_TOKEN's permissions")
        return HubError(f"the Hub answered {status} for {repo}: {error}")
    return HubError(
        f"cannot reach the Hub at {endpoint()} ({type(error).__name__}); "
        "check the network connection, or HF_ENDPOINT"
    )


def list_files(repo: str, revision: str) -> tuple[str, list[RemoteFile]]:
    """The commit a revision points to, and the wanted files in it with their sizes."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=token())
    try:
        commit = api.repo_info(repo, revision=revision).sha
        if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
            raise HubError(f"the Hub sent {commit!r} as the commit of {repo}; not a commit id")
        tree = list(api.list_repo_tree(repo, revision=commit, recursive=True))
    except HubError:
        raise
    except Exception as e:  # every failure of the client becomes one clear line
        raise explain(e, repo) from e
    files = []
    for f in tree:
        path, size = getattr(f, "path", None), getattr(f, "size", None)
        if size is None or not isinstance(path, str) or not wanted(path):
            continue
        if not is_plain_name(path) or not isinstance(size, int) or size < 0:
            raise HubError(
                f"the Hub listed a file {path!r} of size {size!r} in {repo}; refusing it"
            )
        files.append(RemoteFile(path, size))
    if not any(f.name.endswith(SUFFIX) for f in files):
        paths = [getattr(f, "path", None) for f in tree]
        unsafe = [p for p in paths if isinstance(p, str) and pickled(p)]
        more = " (only pickle weights, which localmix never loads)" if unsafe else ""
        raise HubError(f"{repo}@{revision} has no safetensors weights{more}")
    return commit, sorted(files, key=lambda f: f.name)


def check_space(
    files: list[RemoteFile], commit: str, repo: str, store: Path, quantize: bool
) -> None:
    """Refuse up front when the download (and the quantized copy) cannot fit on disk."""
    snapshot = repo_folder(repo) / "snapshots" / commit
    missing = sum(f.size for f in files if not (snapshot / f.name).exists())
    weights = sum(f.size for f in files if f.name.endswith(SUFFIX))
    needs = {cache_dir(): missing}
    if quantize:
        needs[store] = needs.get(store, 0) + int(weights * QUANTIZED_SIZE_RATIO)
    by_disk: dict[int, tuple[Path, int, int]] = {}
    for path, n in needs.items():
        probe, free = free_space(path)
        dev = probe.stat().st_dev
        by_disk[dev] = (probe, free, by_disk.get(dev, (probe, free, 0))[2] + n)
    for probe, free, n in by_disk.values():
        if free < n:
            raise DiskSpaceError(
                f"not enough disk space on {probe}: this pull needs {n / 1e9:.1f} GB, "
                f"{free / 1e9:.1f} GB are free; nothing was written"
            )


def download_file(
    repo: str, commit: str, name: str, size: int, progress: Progress | None = None
) -> Path:
    """One file (of `size` bytes, as listed) into the cache, continuing a partial download;
    returns its snapshot path. The commit, the name and the ETag the Hub sends are checked
    before they become paths."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    if not COMMIT.fullmatch(commit) or not is_plain_name(name):
        raise HubError(f"refusing to store {name!r} of commit {commit!r}: not a safe file name")
    listed = size
    folder = repo_folder(repo)
    link = folder / "snapshots" / commit / name
    url = hf_hub_url(repo, name, revision=commit, endpoint=endpoint())
    try:
        meta = get_hf_file_metadata(url, token=token(), endpoint=endpoint())
    except Exception as e:
        raise explain(e, repo) from e
    etag, sent = meta.etag, meta.size
    if not etag:
        raise HubError(f"the Hub sent no ETag for {name}; cannot cache it safely")
    if not isinstance(etag, str) or not ETAG.fullmatch(etag):
        raise HubError(
            f"the Hub sent {etag!r} as the ETag of {name}; not a hex digest, refusing it"
        )
    if sent != listed:
        raise HubError(f"{name}: the Hub listed {listed} bytes but sends {sent!r}; refusing it")
    blob = folder / "blobs" / etag
    if link.exists() and blob.exists() and blob.stat().st_size == size:
        if progress:
            progress(name, size, size)
        return link
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(etag + ".incomplete")
    if not blob.exists() or blob.stat().st_size != size:
        start = partial.stat().st_size if partial.exists() else 0
        if start > (size or 0):
            partial.unlink()
            start = 0
        headers = build_hf_headers(token=token())
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            with get_session().stream(
                "GET", meta.location or url, headers=headers, follow_redirects=True, timeout=60
            ) as response:
                if response.status_code == 416:  # already complete
                    pass
                elif response.status_code not in (200, 206):
                    raise HubError(f"{name}: the Hub answered {response.status_code}")
                else:
                    mode = "ab" if start and response.status_code == 206 else "wb"
                    done = start if mode == "ab" else 0
                    if progress and done:  # resumed: where it starts, before any new byte
                        progress(name, done, size)
                    with open(partial, mode) as f:
                        for chunk in response.iter_bytes(CHUNK):
                            done += len(chunk)
                            if done > size:
                                raise HubError(f"{name}: the Hub sent more than {size} bytes")
                            f.write(chunk)
                            if progress:
                                progress(name, done, size)
        except HubError:
            raise
        except OSError as e:
            raise HubError(
                f"{name}: writing {partial} failed ({e}); free some space and "
                "pull again: the part downloaded is kept"
            ) from e
        except Exception as e:
            raise HubError(
                f"{name}: download interrupted ({type(e).__name__}); pull again "
                "to continue where it stopped"
            ) from e
        if partial.stat().st_size != size:
            raise HubError(
                f"{name}: got {partial.stat().st_size} of {size} bytes; pull again to continue"
            )
        os.replace(partial, blob)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def pull(ref: str, store: Path, quantize: bool, progress: Progress | None = None) -> Path:
    """Download what a model needs; returns its snapshot directory. Writes only inside the
    repository's folder of the cache (and its lock, under `.locks`); a second pull of the same
    repository waits for the first, then finds its files there."""
    repo, revision = parse_ref(ref)
    commit, files = list_files(repo, revision)
    check_space(files, commit, repo, store, quantize)
    lock = cache_dir() / ".locks" / repo_folder(repo).name
    try:
        with exclusive(
            lock, lambda: progress and progress(f"waiting for another pull of {repo}", 0, 0)
        ):
            for f in files:
                download_file(repo, commit, f.name, f.size, progress)
            refs = repo_folder(repo) / "refs"
            refs.mkdir(parents=True, exist_ok=True)
            (refs / revision.replace("/", "--")).write_text(commit)
    except QuantError as e:  # the lock could not be taken
        raise HubError(str(e)) from e
    return repo_folder(repo) / "snapshots" / commit
