"""The one atomic-output helper (llava_gguf/outputs.py) and every command that writes through it:
temporaries created exclusively, nothing written through a symlink we did not create, nothing replaced
without --force, one run at a time per output, a committed pair from one run."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from llava_gguf.errors import LlavaGgufError

from support import legacy_mmproj, one_error_line, run_cli, wait_for_temporaries

VICTIM_TEXT = "precious data the victim can write\n"


@pytest.fixture()
def victim(tmp_path) -> Path:
    v = tmp_path / "elsewhere" / "victim.txt"
    v.parent.mkdir()
    v.write_text(VICTIM_TEXT)
    return v


def _plant(outdir: Path, finals: list[str], victim: Path) -> None:
    """Symlinks to the victim under every name an attacker could predict: the old `<final>.partial`,
    convert's old F16 stage name, and a name in our temporaries' pattern."""
    outdir.mkdir(parents=True, exist_ok=True)
    for f in finals:
        for n in (f + ".partial", f".{f}.aaaaaaaa.partial", f".{f}.aaaaaaaa.f16.partial"):
            (outdir / n).symlink_to(victim)
    (outdir / ".tiny-default-F16.gguf.intermediate.partial").symlink_to(victim)


def _regular(p: Path) -> bool:
    return stat.S_ISREG(os.lstat(p).st_mode)


def test_planted_partial_symlinks_are_not_followed(tiny, victim, tmp_path):
    """Item 1: convert, convert --outtype Q4_K_M, quantize and repair in a directory holding symlinks
    under the temporary names they used to open: the victim is untouched, the outputs are regular files."""
    ckpt = tiny()
    out = tmp_path / "shared"
    finals = ["tiny-default-F16.gguf", "mmproj-tiny-default-F16.gguf", "tiny-default-Q4_K_M.gguf",
              "x-Q8_0.gguf", "fixed.gguf"]
    _plant(out, finals, victim)
    p = run_cli("convert", str(ckpt), "-o", str(out))
    assert p.returncode == 0, p.stderr
    p = run_cli("convert", str(ckpt), "-o", str(out), "--outtype", "Q4_K_M", "--force")
    assert p.returncode == 0, p.stderr
    p = run_cli("quantize", str(out / finals[0]), "--type", "Q8_0", "-o", str(out / finals[3]))
    assert p.returncode == 0, p.stderr
    legacy = legacy_mmproj(out / finals[1], tmp_path / "legacy.gguf")
    p = run_cli("repair", str(legacy), "-o", str(out / finals[4]))
    assert p.returncode == 0, p.stderr
    assert victim.read_text() == VICTIM_TEXT
    for f in finals:
        assert _regular(out / f), f
    # the planted links are still there, untouched, and nothing else was left
    links = sorted(n.name for n in out.iterdir() if n.is_symlink())
    assert len(links) == 3 * len(finals) + 1
    assert sorted(n.name for n in out.iterdir() if not n.is_symlink()) == sorted(finals)


def test_an_existing_final_symlink_is_replaced_only_with_force(tiny, converted, victim, tmp_path):
    llm, _ = converted(tiny())
    out = tmp_path / "q"
    out.mkdir()
    final = out / "x-Q8_0.gguf"
    final.symlink_to(victim)
    one_error_line(run_cli("quantize", str(llm), "--type", "Q8_0", "-o", str(final)), "already exists", "--force")
    assert final.is_symlink() and victim.read_text() == VICTIM_TEXT
    dangling = out / "y-Q8_0.gguf"
    dangling.symlink_to(tmp_path / "nowhere" / "z")  # a dangling link is something existing too
    one_error_line(run_cli("quantize", str(llm), "--type", "Q8_0", "-o", str(dangling)), "already exists")
    assert not (tmp_path / "nowhere").exists()
    p = run_cli("quantize", str(llm), "--type", "Q8_0", "-o", str(final), "--force")
    assert p.returncode == 0, p.stderr
    assert _regular(final) and victim.read_text() == VICTIM_TEXT  # the link replaced, not followed
    assert sorted(n.name for n in out.iterdir()) == ["x-Q8_0.gguf", "y-Q8_0.gguf"]


def test_temporaries_are_exclusive_unique_and_private(tmp_path):
    from llava_gguf.gguf.outputs import OutputSet, temp_pattern

    a = OutputSet(tmp_path, ["a.gguf", "b.gguf"], force=False)
    b = OutputSet(tmp_path, ["c.gguf"], force=False)
    a.prepare()
    b.prepare()
    try:
        names = a.temp_names + b.temp_names
        assert len(set(names)) == 3
        for n in names:
            assert n.parent == tmp_path and n.name.startswith(".") and n.name.endswith(".partial")
            assert stat.S_IMODE(os.lstat(n).st_mode) == 0o600  # private until committed
        assert temp_pattern("a.gguf").fullmatch(a.temp_names[0].name)
        # writers are given the descriptor's path: a rename of the name cannot redirect them
        with open(a.paths[0], "wb") as f:
            f.write(b"one")
        assert a.temp_names[0].read_bytes() == b"one"
        with a.open_write(1) as f:
            f.write(b"two")
        a.commit()
        assert (tmp_path / "a.gguf").read_bytes() == b"one" and (tmp_path / "b.gguf").read_bytes() == b"two"
        assert stat.S_IMODE(os.stat(tmp_path / "a.gguf").st_mode) == 0o666 & ~_umask()
    finally:
        b.discard()
    assert sorted(n.name for n in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_commit_without_force_never_replaces_a_file_created_meanwhile(tmp_path):
    """Another program creating the output while we write: without --force it is kept, and nothing
    of ours appears (neither output of the pair)."""
    from llava_gguf.gguf.outputs import atomic_outputs

    with pytest.raises(LlavaGgufError, match="already exists"):
        with atomic_outputs(tmp_path, ["llm.gguf", "mmproj.gguf"], force=False) as out:
            for i in range(2):
                with out.open_write(i) as f:
                    f.write(b"ours")
            (tmp_path / "mmproj.gguf").write_text("theirs")
    assert sorted(n.name for n in tmp_path.iterdir()) == ["mmproj.gguf"]
    assert (tmp_path / "mmproj.gguf").read_text() == "theirs"


def test_a_swapped_temporary_is_not_committed(tmp_path, victim):
    """Someone who can write the directory renames our temporary away and puts a symlink in its place:
    the writer still writes our inode (/proc/self/fd), and the commit refuses the swapped name."""
    from llava_gguf.gguf.outputs import atomic_outputs

    with pytest.raises(LlavaGgufError, match="replaced while it was being written"):
        with atomic_outputs(tmp_path / "o", ["x.gguf"], force=False) as out:
            name = out.temp_names[0]
            os.rename(name, tmp_path / "moved")
            name.symlink_to(victim)
            with open(out.paths[0], "wb") as f:
                f.write(b"data")
    assert victim.read_text() == VICTIM_TEXT
    assert (tmp_path / "moved").read_bytes() == b"data"
    assert not (tmp_path / "o" / "x.gguf").exists()


def test_stale_temporary_of_a_killed_run_is_removed(tmp_path):
    from llava_gguf.gguf.outputs import atomic_outputs

    stale = tmp_path / ".x.gguf.abcdefgh.partial"
    stale.write_bytes(b"half a model")
    other = tmp_path / ".y.gguf.abcdefgh.partial"  # another output's: not ours to judge
    other.write_bytes(b"")
    with atomic_outputs(tmp_path, ["x.gguf"], force=False) as out:
        with out.open_write(0) as f:
            f.write(b"whole")
    assert sorted(n.name for n in tmp_path.iterdir()) == [".y.gguf.abcdefgh.partial", "x.gguf"]


def test_session_save_is_atomic_and_refuses_to_replace(tmp_path, victim):
    from llava_gguf.runtime.session import ChatSession

    class NoModel:  # save() touches no model
        pass

    s = ChatSession(NoModel(), system="be brief")  # type: ignore[arg-type]
    path = tmp_path / "t.json"
    assert s.save(path) == path
    first = path.read_text()
    with pytest.raises(LlavaGgufError, match="already exists") as e:
        s.save(path)
    assert "--force" in str(e.value)
    s.system = "be verbose"
    s.save(path, force=True)
    assert path.read_text() != first
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    with pytest.raises(LlavaGgufError, match="already exists"):
        s.save(link)
    s.save(link, force=True)
    assert victim.read_text() == VICTIM_TEXT and _regular(link)
    (tmp_path / ".t2.json.aaaaaaaa.partial").symlink_to(victim)
    (tmp_path / "t2.json.partial").symlink_to(victim)
    s.save(tmp_path / "t2.json")
    assert victim.read_text() == VICTIM_TEXT
    with pytest.raises(LlavaGgufError, match="is a directory"):
        s.save(tmp_path)
    assert not [n for n in tmp_path.iterdir() if n.name.endswith(".partial") and not n.is_symlink()]


def test_session_load_errors_are_one_line(tmp_path):
    from llava_gguf.runtime.session import ChatSession

    s = ChatSession(object())  # type: ignore[arg-type]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    cases = [(tmp_path / "missing.json", "cannot read"), (tmp_path, "cannot read"), (deep, "not a llava-gguf"),
             (tmp_path / "bin.json", "not a llava-gguf")]
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    for path, words in cases:
        with pytest.raises(LlavaGgufError, match=words) as e:
            s.load(path)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- concurrency
def test_two_runs_on_one_output(tiny, tmp_path):
    """Item 4, two real processes: while one convert writes OUTDIR, a second one for the same outputs
    (with --force) fails at once with one line naming the first; the first commits a consistent pair."""
    ckpt = tiny(text_hidden=1024, text_ff=2816, text_layers=4, vocab_size=8192)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llava_gguf", "convert", str(ckpt), "-o", str(out), "--outtype", "q8_0"]
    first = subprocess.Popen(cmd + ["--name", "m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_temporaries(first, out, count=2, min_size=2**20)
        first.send_signal(signal.SIGSTOP)  # held mid-write, however fast this machine is
        try:
            second = subprocess.run(cmd + ["--name", "m", "--force"], capture_output=True, text=True, timeout=120)
            line = one_error_line(second, "being written by another run", f"pid {first.pid}")
            assert "convert" in line
            # an unrelated output in the same directory is not held up
            other = run_cli("convert", str(tiny()), "-o", str(out), "--name", "other")
            assert other.returncode == 0, other.stderr
        finally:
            first.send_signal(signal.SIGCONT)
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["m-Q8_0.gguf", "mmproj-m-F16.gguf", "other-F16.gguf", "mmproj-other-F16.gguf"])
    r = gguf.GGUFReader(out / "m-Q8_0.gguf")  # a whole file: its tensors end where the file does
    end = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)
    assert end <= (out / "m-Q8_0.gguf").stat().st_size


def test_forced_runs_racing_commit_one_pair(tiny, tmp_path):
    """Item 4: --force runs of two different checkpoints under one --name, started together into one
    OUTDIR: each fails with the one-line 'another run' error or commits, and the LLM + mmproj left are
    both from the same checkpoint."""
    from llava_gguf.convert import convert_checkpoint

    ckpts = [tiny(), tiny(seed=1)]
    refs = []
    for i, ck in enumerate(ckpts):
        r = convert_checkpoint(ck, tmp_path / f"ref{i}", name="m")
        refs.append((r.llm.read_bytes(), r.mmproj.read_bytes()))
    assert refs[0][0] != refs[1][0] and refs[0][1] != refs[1][1]
    out = tmp_path / "out"
    for round_ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "llava_gguf", "convert", str(ck), "-o", str(out), "--force",
                                   "--name", "m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for ck in ckpts + ckpts]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        assert any(rc == 0 for rc, _ in results), results
        for rc, err in results:
            assert "Traceback" not in err
            if rc != 0:
                lines = err.strip().splitlines()
                assert len(lines) == 1 and "being written by another run" in lines[0], err
        assert sorted(p.name for p in out.iterdir()) == ["m-F16.gguf", "mmproj-m-F16.gguf"]
        pair = ((out / "m-F16.gguf").read_bytes(), (out / "mmproj-m-F16.gguf").read_bytes())
        assert pair in refs, f"round {round_}: a mixed pair"


def test_output_directory_is_not_left_locked_or_littered(tiny, tmp_path):
    """No lock file: after runs that succeeded, failed and were refused, the directory holds the outputs."""
    ckpt = tiny()
    out = tmp_path / "out"
    assert run_cli("convert", str(ckpt), "-o", str(out)).returncode == 0
    one_error_line(run_cli("convert", str(ckpt), "-o", str(out)), "already exists")
    assert run_cli("convert", str(ckpt), "-o", str(out), "--force").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["mmproj-tiny-default-F16.gguf", "tiny-default-F16.gguf"]
    shutil.rmtree(out)
