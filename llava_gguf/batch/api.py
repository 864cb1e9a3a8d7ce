"""`llava_gguf.batch.run(...)`: every check made before any work (one-line LlavaGgufError), then the records
answered in this process (batch.runner) or by model actors on Ray (batch.cluster)."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from llava_gguf.batch.cluster import Cluster, run_on_ray
from llava_gguf.batch.inputs import read_items
from llava_gguf.batch.runner import BatchRun, Settings, answer, model_id_of
from llava_gguf.errors import InvalidSetting
from llava_gguf.gguf.pairing import locate_pair
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.sampling import Sampling, check_text, is_int, sampling_settings


def run(path: str | Path, source: str | Path, *, prompt: str | None = None, image_folder: str | Path | None = None,
        image_column: str | None = None, question_column: str | None = None, system: str | None = None,
        parallel: int = 2, sampling: Sampling | None = None, threads: int | None = None, n_ctx: int | None = None,
        llm: str | Path | None = None, mmproj: str | Path | None = None, skip: Collection[str] = (),
        ray: Cluster | None = None, verbose: bool = False) -> BatchRun:
    """The model at `path` (what `chat` takes) answering every record of `source` (a directory of images, a
    text file of image paths, LLaVA's question JSONL or a Parquet) whose key is not in `skip` (looked up as
    records are read: a set filled after this call, e.g. from the output's keys, counts). `ray`: answer on
    Ray instead (its workers and threads; `threads` is then each actor's, when the Cluster gives none).
    Iterate the result (a context manager) for records, as they finish."""
    if not is_int(parallel) or not 1 <= parallel <= 64:
        raise InvalidSetting(f"--parallel must be from 1 to 64, not {parallel!r}")
    for text, what in ((system, "the system prompt"), (prompt, "the prompt")):
        if text is not None:
            check_text(text, what)
    found = read_items(Path(source), prompt=prompt, image_folder=image_folder, image_column=image_column,
                       question_column=question_column)
    # a folder or a list is asked one question an image: nothing to share between sequences
    settings = Settings(sampling or sampling_settings(), parallel, system,
                        share_prefixes=found.kind not in ("directory", "text"))
    files = locate_pair(path, llm, mmproj)
    if ray is not None:
        if ray.threads is None and threads is not None:
            ray = replace(ray, threads=threads)
        return run_on_ray(found, files, settings, ray, n_ctx=n_ctx, skip=skip, verbose=verbose)
    engine = Engine.open(*files, n_seq_max=parallel, n_ctx=n_ctx, n_threads=threads, verbose=verbose,
                         share_prefixes=settings.share_prefixes)
    items = (it for it in found.items if it.key not in skip)
    return BatchRun(answer(engine, items, settings, model_id=model_id_of(files[0])), found.kind, found.count,
                    close=engine.close, engine=engine)
