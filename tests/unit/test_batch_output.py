"""The batch's output (llava_gguf/batch/output.py) on real files: exclusive creation, no overwrite without
--force, no symlink followed, one writer at a time, every record durable as written, and --resume that
collects the keys, repairs a torn last line and refuses a file that is not ours."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from llava_gguf.batch.output import Output
from llava_gguf.errors import LlavaGgufError


def record(key: str, **fields) -> dict:
    return {"question_id": key, "prompt": "Q?", "text": f"answer {key}", "answer_id": "a" + key,
            "model_id": "m", "metadata": {}, "key": key, **fields}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(LlavaGgufError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_create_and_every_write_is_on_disk_at_once(tmp_path):
    out = tmp_path / "sub" / "answers.jsonl"
    with Output.open(out, resume=False, force=False) as o:
        assert out.exists() and out.stat().st_size == 0
        for i in range(3):
            assert o.write(record(str(i), text="é ✓\nnew line"))
            got = lines(out)  # read back through another descriptor after each write
            assert len(got) == i + 1 and got[-1]["key"] == str(i) and got[-1]["text"] == "é ✓\nnew line"
        assert o.count == 3 and o.done == {"0", "1", "2"}
    first = out.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith('{"key": "0", "question_id": "0", "prompt": ')  # key first: a torn tail is recognisable
    assert set(lines(out)[0]) >= {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


def test_write_skips_a_key_already_written(tmp_path):
    out = tmp_path / "a.jsonl"
    with Output.open(out) as o:
        assert o.write(record("x")) and not o.write(record("x", text="again"))
        assert o.write(record("y", error="image not found: y.jpg"))
        assert o.errors == 1
    assert [r["key"] for r in lines(out)] == ["x", "y"] and lines(out)[0]["text"] == "answer x"
    with pytest.raises(TypeError):
        Output.open(tmp_path / "b.jsonl").write({"question_id": 1})


def test_existing_output_never_overwritten_without_force(tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text("precious\n")
    text = one_line_error("already exists", Output.open, out, resume=False, force=False)
    assert "--force" in text and "--resume" in text
    assert out.read_text() == "precious\n"


def test_force_starts_afresh(tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text("old\n")
    with Output.open(out, force=True) as o:
        assert out.read_text() == "" and o.done == set()  # replaced at once, not at the end
        o.write(record("1"))
        assert [r["key"] for r in lines(out)] == ["1"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]  # no temporary left


@pytest.mark.parametrize("mode", [dict(resume=False, force=False), dict(resume=False, force=True),
                                  dict(resume=True, force=False)])
def test_symlink_at_the_path_is_refused_and_its_target_untouched(tmp_path, mode):
    target = tmp_path / "victim.txt"
    target.write_text("keep me\n")
    out = tmp_path / "a.jsonl"
    os.symlink(target, out)
    one_line_error("symbolic link", Output.open, out, **mode)
    assert target.read_text() == "keep me\n" and out.is_symlink()
    dangling = tmp_path / "b.jsonl"
    os.symlink(tmp_path / "would-be-created.jsonl", dangling)
    one_line_error("symbolic link", Output.open, dangling, **mode)
    assert not (tmp_path / "would-be-created.jsonl").exists()


def test_second_writer_in_this_process_is_refused(tmp_path):
    out = tmp_path / "a.jsonl"
    with Output.open(out) as o:
        o.write(record("1"))
        assert "another run" in one_line_error("being written", Output.open, out, resume=True)
        one_line_error("being written", Output.open, out, force=True)
        o.write(record("2"))
    assert [r["key"] for r in lines(out)] == ["1", "2"]
    with Output.open(out, resume=True) as o:  # released on close
        assert o.done == {"1", "2"}


def test_second_writer_in_another_process_is_refused(tmp_path):
    out = tmp_path / "a.jsonl"
    code = textwrap.dedent(f"""
        from llava_gguf.batch.output import Output
        from llava_gguf.errors import LlavaGgufError
        try:
            Output.open({str(out)!r}, resume=True)
        except LlavaGgufError as e:
            print(e)
    """)
    with Output.open(out):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "is being written by another run (pid" in p.stdout and str(os.getpid()) in p.stdout


def test_resume_collects_keys_and_appends(tmp_path):
    out = tmp_path / "a.jsonl"
    with Output.open(out) as o:
        o.write(record("1"))
        o.write(record("2", error="context overflow"))
    with Output.open(out, resume=True) as o:
        assert o.done == {"1", "2"} and o.resumed == 2 and o.errors == 1 and o.count == 0
        assert not o.write(record("1"))
        assert o.write(record("3"))
    assert [r["key"] for r in lines(out)] == ["1", "2", "3"]


def test_resume_without_a_file_starts_one(tmp_path):
    out = tmp_path / "new.jsonl"
    with Output.open(out, resume=True) as o:
        assert o.done == set()
        o.write(record("1"))
    assert len(lines(out)) == 1


@pytest.mark.parametrize("cut", [1, 5, 20, -2])
def test_torn_last_line_is_repaired(tmp_path, cut):
    out = tmp_path / "a.jsonl"
    with Output.open(out) as o:
        o.write(record("1"))
        o.write(record("2"))
    whole = out.read_bytes()
    torn = json.dumps({"key": "3", **record("3")}).encode()[:cut]
    out.write_bytes(whole + torn)  # SIGKILL in the middle of record 3's write
    with Output.open(out, resume=True) as o:
        assert out.read_bytes() == whole  # cut back to the end of the last complete line
        assert o.done == {"1", "2"}
        assert o.write(record("3"))
    assert [r["key"] for r in lines(out)] == ["1", "2", "3"]


def test_a_file_that_is_not_ours_is_refused_untouched(tmp_path):
    for name, content in [("llava.jsonl", b'{"question_id": 1, "text": "an answer from LLaVA"}\n'),
                          ("notes.jsonl", b"just text without a newline"),
                          ("image.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00"),
                          ("later.jsonl", b'{"key": "1"}\n{"question_id": 2}\n{"key": "3"')]:
        out = tmp_path / name
        out.write_bytes(content)
        assert "not a llava-gguf batch output" in one_line_error("llava-gguf batch record", Output.open, out,
                                                                  resume=True)
        assert out.read_bytes() == content
    one_line_error(f"{tmp_path / 'later.jsonl'}:2", Output.open, tmp_path / "later.jsonl", resume=True)


def test_a_directory_or_fifo_at_the_path_is_refused(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    one_line_error("is a directory", Output.open, tmp_path / "d.jsonl", resume=True)
    os.mkfifo(tmp_path / "f.jsonl")
    one_line_error("not a regular file", Output.open, tmp_path / "f.jsonl", resume=True)  # and does not block


def test_write_after_close_is_an_error(tmp_path):
    o = Output.open(tmp_path / "a.jsonl")
    o.close()
    assert o.closed
    with pytest.raises(ValueError):
        o.write(record("1"))


def test_a_full_disk_is_one_line_and_leaves_no_half_record(tmp_path):
    """A file size limit stands in for a full disk (both are a write that stops part way): one line from
    write_error, and the short write cut back so the file still ends with a complete record."""
    out = tmp_path / "a.jsonl"
    code = textwrap.dedent(f"""
        import resource, signal
        from llava_gguf.batch.output import Output
        from llava_gguf.errors import LlavaGgufError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        with Output.open({str(out)!r}) as o:
            try:
                for i in range(10):
                    o.write({{"key": str(i), "text": "x" * 100}})
            except LlavaGgufError as e:
                print(i, e)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    failed_at, _, message = p.stdout.strip().partition(" ")
    assert message == f"file size limit reached writing {out} (see `ulimit -f`)"
    data = out.read_bytes()
    assert data.endswith(b"\n") and [r["key"] for r in lines(out)] == [str(i) for i in range(int(failed_at))]
    with Output.open(out, resume=True) as o:
        assert o.done == {str(i) for i in range(int(failed_at))}
