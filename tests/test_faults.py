"""Faults with real files, for every writing command (convert, convert --outtype Q4_K_M, quantize, imatrix,
repair, ChatSession.save): a full disk (a small tmpfs: the suite runs as root), a file-size limit
(RLIMIT_FSIZE in the child), a read-only file system, SIGKILL mid-write. Each ends in one line on
stderr, and nothing is left that passes as complete."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from llava_gguf.errors import LlavaGgufError

from support import run_cli, wait_for_temporaries
from support import legacy_mmproj, one_error_line


def _mount_tmpfs(where: Path, *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=16m",) + options), "tmpfs", str(where)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}): needs root")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture()
def full_fs(tmp_path):
    """A 16 MiB tmpfs filled up to its last page: outputs get a directory and a few KiB."""
    fs = tmp_path / "fs"
    _mount_tmpfs(fs)
    try:
        out = fs / "out"
        out.mkdir()
        vfs = os.statvfs(fs)
        free = vfs.f_bavail * vfs.f_frsize
        with open(fs / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free - 4096)
        yield out
    finally:
        _umount(fs)


@pytest.fixture()
def read_only_fs(tmp_path):
    fs = tmp_path / "ro"
    _mount_tmpfs(fs)
    (fs / "out").mkdir()
    p = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True, text=True)
    if p.returncode != 0:
        _umount(fs)
        pytest.skip(f"cannot remount read-only: {p.stderr.strip()}")
    try:
        yield fs / "out"
    finally:
        _umount(fs)


def _commands(tiny, converted, tmp_path: Path, out: Path) -> list[tuple[str, list[str], Path]]:
    """(label, CLI args, the final output the message must name) for every writing command."""
    ckpt = tiny()
    llm, mmproj = converted(ckpt)
    legacy = legacy_mmproj(mmproj, tmp_path / "legacy.gguf")
    return [
        ("convert", ["convert", str(ckpt), "-o", str(out)], out / "tiny-default-F16.gguf"),
        ("convert-q4", ["convert", str(ckpt), "-o", str(out), "--outtype", "Q4_K_M"], out / "tiny-default-Q4_K_M.gguf"),
        ("quantize", ["quantize", str(llm), "--type", "Q8_0", "-o", str(out / "x-Q8_0.gguf")], out / "x-Q8_0.gguf"),
        ("imatrix", ["imatrix", str(llm), "-o", str(out / "im.gguf"), "--chunks", "2"], out / "im.gguf"),
        ("repair", ["repair", str(legacy), "-o", str(out / "fixed.gguf")], out / "fixed.gguf"),
    ]


def _no_traceback(line: str, p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stderr and ".partial" not in line and "/proc/self" not in line, p.stderr
    assert "basic_ios" not in line and "iostream" not in line, line


def test_disk_full_for_every_writing_command(tiny, converted, tmp_path, full_fs):
    """Items 11 and 'disk full': one line naming the output (never the temporary), nothing left."""
    for label, args, final in _commands(tiny, converted, tmp_path, full_fs):
        p = run_cli(*args)
        line = one_error_line(p, "no space left on device writing")
        assert str(final.parent) in line, (label, line)
        if label not in ("convert", "convert-q4"):  # convert names whichever of its pair ran out of room
            assert str(final) in line, (label, line)
        _no_traceback(line, p)
        assert list(full_fs.iterdir()) == [], (label, list(full_fs.iterdir()))
    from llava_gguf.runtime.session import ChatSession

    with open(full_fs.parent / "filler", "ab") as f:  # the last page too
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size + 4096)
        except OSError:
            pass
    with pytest.raises(LlavaGgufError, match="no space left on device writing") as e:
        ChatSession(object(), system="x" * 10000).save(full_fs / "t.json")  # type: ignore[arg-type]
    assert "\n" not in str(e.value)
    assert list(full_fs.iterdir()) == []


def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize("label", ["convert", "quantize", "repair"])
def test_file_size_limit(tiny, converted, tmp_path, label):
    out = tmp_path / "out"
    out.mkdir()
    args, final = next((a, f) for lab, a, f in _commands(tiny, converted, tmp_path, out) if lab == label)
    p = subprocess.run([sys.executable, "-m", "llava_gguf", *args], capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size(64 * 1024))
    line = one_error_line(p, "file size limit reached writing")
    _no_traceback(line, p)
    assert str(out) in line
    assert list(out.iterdir()) == []


def test_read_only_output_file_system(tiny, converted, tmp_path, read_only_fs):
    """Item 6: one line for every writing command (the temporary's cleanup used to raise EROFS again)."""
    for label, args, _ in _commands(tiny, converted, tmp_path, read_only_fs):
        p = run_cli(*args)
        one_error_line(p, "read-only file system")
        assert "Traceback" not in p.stderr, (label, p.stderr)
    p = run_cli("convert", str(tiny()), "-o", str(read_only_fs / "new" / "dir"))
    one_error_line(p, "cannot create output directory", "read-only file system")
    from llava_gguf.runtime.session import ChatSession

    with pytest.raises(LlavaGgufError, match="(?i)read-only file system") as e:
        ChatSession(object()).save(read_only_fs / "t.json")  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def _kill_when_writing(cmd: list[str], out: Path, min_size: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "llava_gguf", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_temporaries(proc, out, min_size=min_size)
    proc.kill()
    proc.communicate(timeout=60)


def _looks_complete(out: Path) -> list[str]:
    """Names a user or a tool would take for an output: anything but our hidden temporaries."""
    return [p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".partial"))]


def test_sigkill_mid_convert_then_a_new_run(tiny, tmp_path):
    ckpt = tiny(text_hidden=1024, text_ff=2816, text_layers=4, vocab_size=8192)
    out = tmp_path / "out"
    _kill_when_writing(["convert", str(ckpt), "-o", str(out), "--outtype", "q8_0"], out, 2**20)
    assert _looks_complete(out) == []
    # the next run (no --force needed: nothing was committed) takes over and removes the dead run's files
    p = run_cli("convert", str(ckpt), "-o", str(out), "--outtype", "q8_0")
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in out.iterdir()) == sorted([f"{ckpt.name}-Q8_0.gguf", f"mmproj-{ckpt.name}-F16.gguf"])


def test_sigkill_mid_quantize_then_a_new_run(tiny, converted, tmp_path):
    llm, _ = converted(tiny(text_hidden=1024, text_ff=2816, text_layers=4, vocab_size=8192))
    out = tmp_path / "out"
    out.mkdir()
    args = ["quantize", str(llm), "--type", "Q4_K_M", "-o", str(out / "x.gguf"), "--threads", "1"]
    _kill_when_writing(args, out, 1)
    assert _looks_complete(out) == []
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert [x.name for x in out.iterdir()] == ["x.gguf"]
    gguf.GGUFReader(out / "x.gguf")


def _interrupt_when_writing(cmd: list[str], out: Path, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "llava_gguf", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_temporaries(proc, out)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10  # at once, not when llama.cpp is done
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_native_quantization_leaves_nothing(tiny, converted, tmp_path, sig):
    """Ctrl-C / SIGTERM while llama.cpp writes our temporary (through /proc/self/fd/N): one line, exit
    130, nothing left; the abandoned worker's descriptor is parked on /dev/null, not reused."""
    llm, _ = converted(tiny(text_hidden=1024, text_ff=2816, text_layers=4, vocab_size=8192))
    out = tmp_path / "out"
    out.mkdir()
    p = _interrupt_when_writing(["quantize", str(llm), "--type", "IQ3_S", "-o", str(out / "x.gguf"),
                                 "--threads", "1"], out, sig)
    assert p.returncode == 130 and p.stderr.strip() == "error: interrupted", p.stderr
    time.sleep(0.5)
    assert list(out.iterdir()) == []
