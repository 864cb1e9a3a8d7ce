"""A checkpoint named by its Hugging Face Hub repo id (`ORG/NAME`), fetched through huggingface_hub into
the standard cache: only the files convert reads, weights in one format. A local path of the same spelling
always wins. The convert layer's one door to the network; everything above it (checks, cli) comes through here.

What huggingface_hub (2.4.0) does for us, read from its source: the cache (HF_HUB_CACHE / HF_HOME), the token
(HF_TOKEN or `hf auth login`), HF_HUB_OFFLINE=1 and an unreachable Hub served from the cache, progress bars,
and resuming a download the network cut (`http_get` retries with a `Range` header; a partial file is
dropped when the process gives up, `_download_to_tmp_and_move`)."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from llava_gguf.errors import LlavaGgufError

# huggingface_hub's REPO_ID_REGEX (utils/_validators.py) with the namespace required: ASCII letters, digits,
# `_`, `-`, `.`; a part starts and ends with a letter, digit or `_`; at most 96 characters a part
_PART = r"[A-Za-z0-9_](?:[\w\-.]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}", re.ASCII)

# what convert reads besides the weights (the model card: gguf-py's general.* metadata, as from a local clone)
CHECKPOINT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                    "chat_template.json", "chat_template.jinja", "tokenizer.json", "tokenizer.model",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                    "merges.txt", "README.md")
# a separate CLIP tower (mm_vision_tower): its configuration and image pre-processing
TOWER_FILES = ("config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint argument points: the directory to read, and the name its outputs take (a local
    directory's own name; for `ORG/NAME`, NAME, never the snapshot's commit hash)."""

    path: Path
    name: str
    repo_id: str | None = None
    revision: str | None = None


def is_repo_id(text: str) -> bool:
    """`ORG/NAME` as the Hub spells repo ids (a bare NAME is taken for a path)."""
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def resolve_checkpoint(arg: str | Path | CheckpointSource, revision: str | None = None, *,
                       progress: bool | None = None, files: tuple[str, ...] = CHECKPOINT_FILES) -> CheckpointSource:
    """A path that exists, as it is; else a repo id, downloaded (or found in the cache) at `revision`.
    A CheckpointSource (already resolved: the CLI fetches before its own progress display) as it is."""
    if isinstance(arg, CheckpointSource):
        return arg
    path = Path(arg)
    if path.exists():
        if revision is not None:
            raise LlavaGgufError(f"--revision applies to a Hugging Face repo id; {arg} is a local path")
        return CheckpointSource(path, path.resolve().name)
    text = str(arg)
    if not is_repo_id(text):
        raise LlavaGgufError(f"{arg} does not exist", "give a checkpoint directory, or a Hugging Face repo id "
                             "such as llava-hf/llava-1.5-7b-hf")
    snapshot = fetch(text, revision, files, progress=progress)
    return CheckpointSource(snapshot, text.split("/")[1], text, revision)


@contextlib.contextmanager
def named_view(path: Path, name: str) -> Iterator[Path]:
    """`path` seen as a directory called `name`, for readers that take a model's name from its directory's
    (gguf-py's Metadata.load, `Path.resolve().name`): a temporary directory of that name whose entries are
    symlinks to `path`'s (the cache's snapshot files are symlinks already). `path` itself when so called."""
    if path.name == name:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="llava-gguf-") as tmp:
        view = Path(tmp) / name
        view.mkdir()
        for entry in path.iterdir():
            (view / entry.name).symlink_to(entry.absolute(), target_is_directory=entry.is_dir())
        yield view


def fetch(repo_id: str, revision: str | None, files: tuple[str, ...], *, weights: bool = True,
          progress: bool | None = None) -> Path:
    """The cached snapshot directory of `repo_id` holding `files` (those the repo has) and, with `weights`,
    its weights in one format: *.safetensors (with their index) when the repo has them, else
    pytorch_model*.bin. Downloads what is missing unless offline (HF_HUB_OFFLINE=1 or no network), where
    the cache answers alone. Every failure is one LlavaGgufError."""
    level = logging.getLogger("huggingface_hub").level
    # why: huggingface_hub is heavy (an HTTP stack, seconds of imports) and only a Hub name needs it; its
    # submodules load lazily (`hub.errors` & co. exist once imported), utils.logging resets its logger's level
    import huggingface_hub as hub
    import huggingface_hub.constants  # why: heavy, as above
    import huggingface_hub.errors  # why: heavy, as above
    import huggingface_hub.utils  # why: heavy, as above
    import huggingface_hub.utils.logging  # why: heavy, as above; configures (resets) its logger when first imported

    hub_errors = hub.errors
    if level != logging.NOTSET:  # importing it sets its logger's level (utils/logging.py): keep the caller's
        logging.getLogger("huggingface_hub").setLevel(level)

    quiet = not (sys.stderr.isatty() if progress is None else progress)
    bars = hub.utils.disable_progress_bars() if quiet else contextlib.nullcontext()
    with bars:
        try:
            return _fetch(hub, repo_id, revision, files, weights)
        except hub_errors.GatedRepoError:
            raise _gated(hub, repo_id) from None
        except hub_errors.RepositoryNotFoundError as e:
            raise _not_found(repo_id, e) from None
        except hub_errors.RevisionNotFoundError:
            raise LlavaGgufError(f"{repo_id} has no revision {revision!r}",
                                 "give a branch, tag or commit hash of the repository") from None
        except hub_errors.LocalEntryNotFoundError as e:  # IncompleteSnapshotError among them
            raise LlavaGgufError(f"the cached copy of {repo_id} lacks files convert needs, and HF_HUB_OFFLINE is set "
                                 f"or the Hub cannot be reached ({type(e).__name__})",
                                 "run again online to complete the download") from None
        except hub_errors.HfHubHTTPError as e:
            raise _http_error(repo_id, e) from None
        except Exception as e:
            if _is_network_error(e):
                raise LlavaGgufError(f"downloading {repo_id} failed: {_first_line(e)}",
                                     "check the network and run again (the files already complete stay in the cache)"
                                     ) from None
            if isinstance(e, OSError):  # the cache not writable, the disk full, a size check failed
                raise LlavaGgufError(f"downloading {repo_id} failed: {e.strerror or _first_line(e)}",
                                     f"the Hugging Face cache is {hub.constants.HF_HUB_CACHE}") from None
            raise


def _fetch(hub, repo_id: str, revision: str | None, files: tuple[str, ...], weights: bool) -> Path:
    names: list[str] | None = None
    listing_error: Exception | None = None
    try:
        info = hub.HfApi().model_info(repo_id, revision=revision, files_metadata=False)
        names = [s.rfilename for s in info.siblings or []]
    except hub.errors.RevisionNotFoundError:
        raise
    except Exception as e:
        # what snapshot_download does (_snapshot_download.py): offline, unreachable, or an HTTP error
        # (401 for a gated repo without the token that downloaded it): the cache answers if it can
        if not (isinstance(e, (hub.errors.OfflineModeIsEnabled, hub.errors.HfHubHTTPError)) or _is_network_error(e)):
            raise
        listing_error = e
    offline = names is None
    if offline:
        names = _cached_names(hub, repo_id, revision)
        if names is None:
            raise _not_cached(hub, repo_id, revision, listing_error)
    wanted, index = _pick(repo_id, names, files, weights)
    snapshot = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=[glob.escape(n) for n in wanted],
                                          local_files_only=offline))
    if index is not None:  # the shards the index names, nothing else (a repo may hold other weight files)
        shards = [s for s in _index_shards(snapshot / index) if s in names]
        snapshot = Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                              allow_patterns=[glob.escape(n) for n in [*wanted, *shards]]))
    return snapshot


def _cached_names(hub, repo_id: str, revision: str | None) -> list[str] | None:
    """The repo's file list as the cache knows it: the tree listing snapshot_download stored, else the
    files of the cached snapshot (a cache filled by an older huggingface_hub or by hand); None if not cached."""
    try:
        return [f.path for f in hub.get_cached_repo_tree(repo_id, revision=revision)]
    except hub.errors.CachedRepoTreeNotFoundError:
        pass
    try:  # no pattern: resolves the revision to the snapshot folder through refs/, checks nothing else
        snapshot = Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[]))
    except hub.errors.LocalEntryNotFoundError:
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _pick(repo_id: str, names: list[str], files: tuple[str, ...], weights: bool) -> tuple[list[str], str | None]:
    """(files to fetch, the weights index whose shards come next): of the repo's top level, safetensors before
    pytorch_model*.bin, by their index when there is one, else every file of the format — exactly what
    convert/checkpoint.py's _weight_files then reads from the snapshot."""
    top = {n for n in names if "/" not in n}
    wanted = [f for f in files if f in top]
    if not weights:
        return wanted, None
    safetensors = sorted(n for n in top if n.endswith(".safetensors"))
    bins = sorted(n for n in top if fnmatchcase(n, "pytorch_model*.bin"))
    for index, shards in (("model.safetensors.index.json", safetensors), ("pytorch_model.bin.index.json", bins)):
        if index in top:
            return [*wanted, index], index
        if shards:
            return [*wanted, *shards], None
    raise LlavaGgufError(f"{repo_id} has no weights convert reads (*.safetensors or pytorch_model*.bin)",
                         "is it a LLaVA checkpoint in the transformers layout? (GGUF or other formats are not converted)")


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise LlavaGgufError(f"{index} has no weight_map", "the index is corrupt")
    return sorted({s for s in weight_map.values() if isinstance(s, str)})


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _gated(hub, repo_id: str) -> LlavaGgufError:
    return LlavaGgufError(f"{repo_id} is a gated repository and no token with access to it was sent",
                          f"accept its terms on {hub.constants.ENDPOINT}/{repo_id}, then set HF_TOKEN or run "
                          "`hf auth login`")


def _not_found(repo_id: str, e: Exception) -> LlavaGgufError:
    if _status(e) == 401:  # the Hub answers 401 both for a missing repo and a private one without a token
        return LlavaGgufError(f"{repo_id} is not a local path, and the Hugging Face Hub has no such repository or "
                              "it is private or gated and no token with access was sent",
                              "check the name; for a private or gated repository set HF_TOKEN or run `hf auth login`")
    return LlavaGgufError(f"{repo_id} is neither a local path nor a repository on the Hugging Face Hub (or a "
                          "private one this token cannot see)", "check the name, ORG/NAME as on huggingface.co")


def _http_error(repo_id: str, e: Exception) -> LlavaGgufError:
    status = _status(e)
    if status == 401:
        return LlavaGgufError(f"the Hugging Face Hub refused access to {repo_id} (401): it is private or gated and "
                              "no valid token was sent", "set HF_TOKEN or run `hf auth login`")
    if status == 403:
        return LlavaGgufError(f"no access to {repo_id} (403 forbidden)",
                              "set HF_TOKEN or run `hf auth login` with a token that can read it")
    return LlavaGgufError(f"the Hugging Face Hub answered {status} for {repo_id}", "try again later")


def _not_cached(hub, repo_id: str, revision: str | None, error: Exception | None) -> LlavaGgufError:
    at = f" at revision {revision!r}" if revision else ""
    cache = hub.constants.HF_HUB_CACHE
    if isinstance(error, hub.errors.OfflineModeIsEnabled):
        return LlavaGgufError(f"{repo_id}{at} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set",
                              "run once online (without HF_HUB_OFFLINE=1) to download it")
    if isinstance(error, hub.errors.GatedRepoError):
        return _gated(hub, repo_id)
    if isinstance(error, hub.errors.RepositoryNotFoundError):
        return _not_found(repo_id, error)
    if isinstance(error, hub.errors.HfHubHTTPError):
        return _http_error(repo_id, error)
    return LlavaGgufError(f"cannot reach the Hugging Face Hub ({hub.constants.ENDPOINT}) for {repo_id}{at}, and it is "
                          f"not in the cache ({cache})", "check the network or proxy, or give a local directory")


def _is_network_error(e: BaseException) -> bool:
    # httpx's transport failures (connect, read, timeout, a cut connection) share the base TransportError;
    # matched by name: importing the HTTP library here would be a second heavy dependency for one isinstance
    return any(c.__name__ == "TransportError" and c.__module__.startswith("httpx") for c in type(e).__mro__)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
