"""`export lmstudio`: a converted pair laid out as LM Studio finds it, `<models dir>/<publisher>/<model>/`
with the LLM and `mmproj-*.gguf` side by side. LM Studio pairs a model with the projector whose file name
starts with `mmproj` in the same folder and silently runs it without vision otherwise
(lmstudio-bug-tracker #356, #2021).

Files are hard-linked where the file system allows (no second copy of gigabytes; the export is instant),
else copied to a temporary, fsynced and renamed into place. A file already there that is the same file (a
link made before) or has the same bytes is left as it is, so running the export again does nothing; a
different file is replaced only with `force`."""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import LlavaGgufError, warn
from llava_gguf.export.source import load_source, slug
from llava_gguf.gguf.outputs import atomic_outputs

DEFAULT_PUBLISHER = "llava-gguf"
# link(2) errors that mean "no hard link here" (another file system, FAT, a FUSE mount, protected_hardlinks,
# the link count limit): the file is copied instead
NO_LINK = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
_CHUNK = 1 << 22
CopyProgress = Callable[[int, int, str], None]  # (bytes done, bytes in all, file name)


@dataclass(frozen=True)
class Placed:
    path: Path
    how: str  # "linked" | "copied" | "already there"


@dataclass(frozen=True)
class LMStudioExport:
    folder: Path  # <models dir>/<publisher>/<model>
    llm: Placed
    mmproj: Placed


def default_models_dir(home: Path | None = None) -> Path:
    """LM Studio's models folder as LM Studio finds its home (lms-common-server `findLMStudioHome`): the
    directory named in ~/.lmstudio-home-pointer, else ~/.cache/lm-studio when it exists (installs before
    0.3), else ~/.lmstudio; the models are in its `models/`."""
    home = Path(home) if home is not None else Path.home()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        pointed = (home / ".lmstudio-home-pointer").read_text("utf-8").strip()
        if pointed and Path(pointed).is_dir():
            return Path(pointed) / "models"
    legacy = home / ".cache" / "lm-studio"
    return (legacy if legacy.is_dir() else home / ".lmstudio") / "models"


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


def link_file(src: Path, dest: Path, *, force: bool) -> None:
    """A hard link `dest` to `src`; raises OSError when the file system has none (NO_LINK). Without `force`
    link(2) itself refuses an existing name; with it a temporary link is renamed over the old file."""
    if not force:
        try:
            os.link(src, dest)
        except FileExistsError:
            raise LlavaGgufError(f"{dest} already exists", "pass --force to replace it") from None
        return
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    os.link(src, tmp)  # an unpredictable new name: link(2) never follows or replaces anything there
    try:
        os.replace(tmp, dest)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_file(src: Path, dest: Path, *, force: bool, progress: CopyProgress | None = None) -> None:
    """`src` copied to a temporary beside `dest`, fsynced and renamed into place (see gguf/outputs.py);
    `progress(done, total, name)` after each chunk (gigabytes across file systems take minutes)."""
    total = src.stat().st_size
    with atomic_outputs(dest.parent, [dest.name], force=force) as out, out.open_write(0) as f, \
            open(src, "rb") as source:
        done = 0
        while chunk := source.read(_CHUNK):
            f.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total, dest.name)


def already_there(src: Path, dest: Path, *, force: bool) -> bool:
    """Whether `dest` is `src` already (the same file, or the same bytes); a one-line error when something
    else is there and may not be replaced."""
    if not os.path.lexists(dest):
        return False
    if dest.is_file() and not dest.is_symlink() and (os.path.samefile(src, dest) or same_bytes(src, dest)):
        return True
    if dest.is_dir() and not dest.is_symlink():
        raise LlavaGgufError(f"{dest} is a directory", "remove it, or choose another --models-dir")
    if not force:
        raise LlavaGgufError(f"{dest} already exists and is a different file", "pass --force to replace it")
    return False


def place_file(src: Path, dest: Path, *, force: bool, present: bool | None = None,
               progress: CopyProgress | None = None) -> Placed:
    """`src` at `dest`: linked, else copied; left alone when it is already there (`present`: what
    already_there said of it, when the caller asked before — a copy is not read through twice)."""
    if already_there(src, dest, force=force) if present is None else present:
        return Placed(dest, "already there")
    try:
        link_file(src, dest, force=force)
        return Placed(dest, "linked")
    except LlavaGgufError:
        raise
    except OSError as e:
        if e.errno not in NO_LINK:
            raise LlavaGgufError(f"cannot create {dest}: {e.strerror}") from None
    copy_file(src, dest, force=force, progress=progress)
    return Placed(dest, "copied")


def layout_names(llm: Path, mmproj: Path, model: str) -> tuple[str, str]:
    """The two file names in the model folder: the LLM's own (never starting with `mmproj`, which would make
    it a projector), the mmproj's with the `mmproj` prefix LM Studio pairs by."""
    llm_name = llm.name if not llm.name.lower().startswith("mmproj") else f"{model}-{llm.name}"
    mmproj_name = mmproj.name if mmproj.name.lower().startswith("mmproj") else f"mmproj-{mmproj.name}"
    return llm_name, mmproj_name


def export_lmstudio(path: Path, models_dir: Path | None = None, *, model: Path | None = None,
                    mmproj: Path | None = None, force: bool = False,
                    progress: CopyProgress | None = None) -> LMStudioExport:
    """Lay the pair in `path` out under `models_dir` (default: LM Studio's own, `default_models_dir`)."""
    source = load_source(Path(path), model, mmproj)
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    if models_dir.exists() and not models_dir.is_dir():
        raise LlavaGgufError(f"{models_dir} is not a directory", "give LM Studio's models folder with --models-dir")
    publisher = slug(source.organization or "", lower=False) or DEFAULT_PUBLISHER
    model_name = slug(source.name, lower=False) or "llava"
    folder = models_dir / publisher / model_name
    llm_name, mmproj_name = layout_names(source.llm, source.mmproj, model_name)
    # refuse before anything is written
    present = {name: already_there(src, folder / name, force=force)
               for src, name in ((source.mmproj, mmproj_name), (source.llm, llm_name))}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlavaGgufError(f"cannot create {folder}: {e.strerror}") from None
    others = sorted(p.name for p in folder.glob("*.gguf")
                    if p.name.lower().startswith("mmproj") and p.name != mmproj_name)
    if others:
        warn(f"{folder} also holds {', '.join(others)}: LM Studio may pair the model with that projector",
             "remove the other mmproj files from the folder")
    results: dict[str, Placed] = {}
    created: list[Path] = []
    try:
        for key, src, name in (("mmproj", source.mmproj, mmproj_name), ("llm", source.llm, llm_name)):
            dest = folder / name
            existed = os.path.lexists(dest)
            results[key] = place_file(src, dest, force=force, present=present[name], progress=progress)
            if not existed:
                created.append(dest)
    except BaseException:
        for dest in created:  # the pair appears together or not at all (a replaced file cannot be restored)
            with contextlib.suppress(OSError):
                os.unlink(dest)
        raise
    return LMStudioExport(folder, results["llm"], results["mmproj"])
