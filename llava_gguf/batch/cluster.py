"""`llava-gguf batch --ray`: the same records as one process, answered by W model actors on Ray Data.

The driver reads and checks the input (the same readers, the same resume keys: records OUT already has are
never sent), turns the records to answer into a Ray Dataset, and `map_batches` hands them to a callable
class, `Answerer`: one model per actor (loaded once, in its constructor), `--parallel` sequences each
through the same scheduler as one process, `num_cpus` = its threads. An actor yields each record as it
finishes (an output block of its own: target_max_block_size), and the driver appends it to OUT (the one
writer: fsynced, resumable) as it arrives, instead of collecting shard files that a crash would strand.

On a cluster every node opens the model and the images at the paths the driver gives (absolute: the same
path on every node, or a shared file system); a Parquet's embedded images travel in the dataset itself."""
from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llava_gguf.batch.inputs import Item, ItemSource
from llava_gguf.batch.runner import BatchRun, Settings, answer, error_record, model_id_of
from llava_gguf.errors import InvalidSetting, LlavaGgufError
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.resources import usable_cpus
from llava_gguf.runtime.sampling import is_int

# Records an actor takes at a time: enough to keep --parallel sequences busy between calls.
_PER_SEQUENCE = 4
_CONNECT_SECONDS = 5.0
_RETRIES = 3


@dataclass(frozen=True)
class Cluster:
    """Where to run: `address` None starts a local Ray with enough logical CPUs for the actors and the read
    stage; "auto" or host:port joins a running cluster. `workers` actors of `threads` threads each (None:
    max(1, cores // workers), cores counted on the local machine or the cluster's smallest node)."""

    workers: int = 2
    threads: int | None = None
    address: str | None = None

    def check(self) -> None:
        if not is_int(self.workers) or not 1 <= self.workers <= 1024:
            raise InvalidSetting(f"--workers must be from 1 to 1024, not {self.workers!r}")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise InvalidSetting(f"--threads must be at least 1, not {self.threads!r}")
        if self.address is not None and not self.address.strip():
            raise InvalidSetting("--ray-address is empty", "give `auto` or the head node's host:port")


def local_threads(workers: int, cores: int | None = None) -> int:
    """The threads of each of `workers` actors sharing `cores` (default: the CPUs this process may use)."""
    return max(1, (cores or usable_cpus()) // workers)


class Answerer:
    """A Ray Data callable class: one model per actor, loaded in the constructor, answering each batch of
    records through `answer` and yielding each record (as JSON) when it finishes."""

    def __init__(self, llm: str, mmproj: str, settings: Settings, threads: int, n_ctx: int | None,
                 model_id: str) -> None:
        try:
            self.engine = Engine.open(llm, mmproj, n_seq_max=settings.parallel, n_ctx=n_ctx, n_threads=threads,
                                      share_prefixes=settings.share_prefixes)
        except LlavaGgufError as e:  # a one-line cause on the driver, not an actor's traceback
            raise RuntimeError(f"{os.uname().nodename}: {e.one_line()}") from None
        self.settings, self.model_id = settings, model_id

    def __call__(self, batch: dict) -> Iterator[dict]:
        items = [_item(json.loads(row), data) for row, data in zip(batch["item"], batch["data"])]
        for record in answer(self.engine, items, self.settings, model_id=self.model_id):
            yield {"record": [json.dumps(record, ensure_ascii=False)]}


def _row(item: Item) -> dict:
    fields = asdict(item)
    data = fields.pop("data", None)
    fields["image"] = None if item.image is None else str(Path(item.image).absolute())
    return {"item": json.dumps(fields, ensure_ascii=False), "data": data or b""}


def _item(fields: dict, data: bytes) -> Item:
    image = fields.pop("image")
    extra = {"data": bytes(data)} if data else {}
    return Item(**fields, image=None if image is None else Path(image), **extra)


def run_on_ray(found: ItemSource, files: tuple[Path, Path], settings: Settings, cluster: Cluster, *, n_ctx: int | None,
               skip: Collection[str], verbose: bool) -> BatchRun:
    """The records of `found` (an ItemSource) not in `skip`, answered on Ray (started or joined now)."""
    cluster.check()
    import ray  # why: heavy (a second or more to import) and an optional extra, only for --ray

    started = _connect(ray, cluster, verbose)
    # closing disconnects this driver (a Ray it started stops with it, a cluster it joined runs on); a Ray
    # the caller had connected already is the caller's
    close = ray.shutdown if started else (lambda: None)
    try:
        threads = cluster.threads or _default_threads(ray, cluster)
        _check_room(ray, cluster, threads)
        remaining = max(1, found.count - len(skip))
        records = _records(ray, found.items, files, settings, cluster.workers, threads, n_ctx, skip,
                           local=cluster.address is None, remaining=remaining)
    except BaseException:
        close()
        raise
    return BatchRun(records, found.kind, found.count, close=close)


def _connect(ray, cluster: Cluster, verbose: bool) -> bool:
    """Start or join Ray (True), or use the one this process is connected to already (False)."""
    quiet = dict(include_dashboard=False, log_to_driver=verbose, logging_level="INFO" if verbose else "ERROR")
    if not verbose:  # Ray's own notices (C++ core worker, Ray Data's plan and timing) are not the user's business
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "CRITICAL")
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # the failure is said once, by us
    if ray.is_initialized():
        _configure_data(ray, verbose)
        return False
    if cluster.address is not None:
        _reachable(cluster.address)
    try:
        if cluster.address is None:
            threads = cluster.threads or local_threads(cluster.workers)
            # "local": a new Ray of our own, even where RAY_ADDRESS or a `ray start` points to another
            ray.init(address="local", num_cpus=cluster.workers * threads + 1, **quiet)
        else:
            ray.init(address=cluster.address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "start a local Ray" if cluster.address is None else f"join the Ray cluster at {cluster.address}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlavaGgufError(f"cannot {where}: {first}",
                             "`ray start --head` on the head node, then --ray-address auto" if cluster.address else ""
                             ) from None
    _configure_data(ray, verbose)
    return True


def _configure_data(ray, verbose: bool) -> None:
    """Ray Data for this run: no progress bars or stats of its own (ours is the progress bar), and a record
    an output block."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose  # ours is the progress bar
    context.enable_operator_progress_bars = verbose
    context.enable_auto_log_stats = False
    # an actor's output block is sent once it holds this many bytes: one record (a few hundred bytes) is more,
    # so each record reaches OUT as it finishes, not with the rest of its call (Ray's default: 128 MiB)
    context.target_max_block_size = 1


def _reachable(address: str) -> None:
    """A host:port (or ray://host:port) that does not answer fails now in one line: Ray itself would retry
    for minutes. "auto" is Ray's to find (it fails at once when no cluster runs here)."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidSetting(f"--ray-address {address!r} is not auto or host:port", "e.g. 10.0.0.1:6379 or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_SECONDS).close()
    except OSError as e:
        raise LlavaGgufError(f"cannot join the Ray cluster at {address}: {e.strerror or e}",
                             "is `ray start --head` running there, and the port open?") from None


def _node_cpus(ray) -> list[int]:
    """The CPUs of each live node that has any (a head started with --num-cpus 0 runs no actor)."""
    return [int(c) for c in (n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")) if c >= 1]


def _default_threads(ray, cluster: Cluster) -> int:
    if cluster.address is None:
        return local_threads(cluster.workers)
    cpus = _node_cpus(ray) or [1]
    return max(1, min(min(cpus), sum(cpus) // cluster.workers))


def _check_room(ray, cluster: Cluster, threads: int) -> None:
    """A cluster too small for the actors fails now: Ray would wait for room without a word."""
    if cluster.address is None:
        return
    cpus = _node_cpus(ray)
    if not cpus or max(cpus) < threads or sum(cpus) < cluster.workers * threads:
        raise InvalidSetting(f"{cluster.workers} actors of {threads} threads need {cluster.workers * threads} CPUs "
                             f"and a node with {threads}; the cluster's nodes have {cpus or 'none'}",
                             "fewer --workers or --threads")


def _records(ray, items: Iterator[Item], files: tuple[Path, Path], settings: Settings, workers: int, threads: int,
             n_ctx: int | None, skip: Collection[str], local: bool, remaining: int) -> Iterator[dict]:
    llm, mmproj = (str(Path(f).absolute()) for f in files)
    model_id = model_id_of(Path(llm))
    # a block per call, and one or more per actor, so a short input still keeps every actor busy
    per_call = max(1, min(settings.parallel * _PER_SEQUENCE, remaining // workers))
    blocks, chunk = [], []
    for item in items:  # read after OUT is open: `skip` holds its keys by now
        if item.key in skip:
            continue
        if item.error is not None:
            yield error_record(item, model_id, item.error)
            continue
        chunk.append(_row(item))
        if len(chunk) == per_call:
            blocks.append(_block(ray, chunk))
            chunk = []
    if chunk:
        blocks.append(_block(ray, chunk))
    if not blocks:
        return
    # the blocks are in Ray's object store (spilled to disk when it fills), not in this process: a Parquet
    # of embedded images does not have to fit in the driver's memory
    dataset = ray.data.from_arrow_refs(blocks)
    # On the Ray this run started, an actor that dies (out of memory, a crash) fails the run, which --resume
    # completes. On a cluster a lost node is normal: Ray restarts its actors and retries their records, a
    # few times (a record that kills every actor it meets must not be retried for ever).
    restarts = {"max_restarts": 0} if local else {"max_restarts": _RETRIES, "max_task_retries": _RETRIES}
    with warnings.catch_warnings():  # max_restarts has no named parameter yet (pyproject pins ray below 2.64)
        warnings.simplefilter("ignore", ray.util.annotations.RayDeprecationWarning)
        answered = _answered(ray, dataset, per_call, threads, workers, restarts,
                             dict(llm=llm, mmproj=mmproj, settings=settings, threads=threads, n_ctx=n_ctx,
                                  model_id=model_id))
    del blocks
    written: set[str] = set()  # a retried call (a restarted actor) answers some records again: written once
    try:
        for row in answered.iter_rows():
            record = json.loads(row["record"])
            if record["key"] not in written:
                written.add(record["key"])
                yield record
    except ray.exceptions.RayError as e:
        raise LlavaGgufError(f"the Ray run failed: {_cause(e)}") from None


def _answered(ray, dataset, per_call: int, threads: int, workers: int, restarts: dict, model: dict):
    """The dataset answered by `workers` Answerer actors of `threads` CPUs each."""
    return dataset.map_batches(
        Answerer, batch_size=per_call, batch_format="numpy", num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=workers), fn_constructor_kwargs=model, **restarts)


def _block(ray, rows: list[dict]):
    """A dataset block of records to answer, put in Ray's object store."""
    import pyarrow as pa  # why: heavy; installed with ray[data], which it is only used with

    return ray.put(pa.Table.from_pylist(rows, schema=pa.schema([("item", pa.string()), ("data", pa.binary())])))


def _cause(error: BaseException) -> str:
    """The innermost one-line cause of a Ray error (an actor's RuntimeError from Answerer, a lost node...):
    Ray wraps what the actor raised (ActorDiedError's text ends with it; SystemException, RayTaskError.cause)."""
    found = type(error).__name__
    for _ in range(16):
        lines = [ln.strip() for ln in str(error).splitlines()
                 if ln.strip() and not ln.startswith((" ", "Traceback")) and not set(ln.strip()) <= set("^~")]
        if lines:
            found = lines[-1].removeprefix("RuntimeError: ")
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException) or inner is error:
            break
        error = inner
    return found[:500]
