"""`batch --ray` on a local Ray (2 actors, 1 thread each) and the shipped model: the records of one process,
resumable the same way, from a Parquet whose images are bytes (sent through Ray) and paths (opened by the
actors); Ray's processes gone when it ends; bad Ray settings one line before anything starts; an actor
that cannot open the model one line too."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llava_gguf.demo import shapes
from llava_gguf.gguf.pairing import locate_pair
from support import one_error_line, run_cli

MAX_TOKENS = 24
SAME = ("key", "question_id", "prompt", "text", "image_sha256", "finish_reason", "error")


@pytest.fixture(scope="module")
def files(shipped_gguf):
    return locate_pair(shipped_gguf)


def ray_processes() -> set[int]:
    found = set()
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray/core/src/ray" in cmd or cmd.startswith(b"ray::") or b"ray/dashboard/" in cmd:
            found.add(int(d.name))
    return found


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def same(records: list[dict]) -> dict:
    return {r["key"]: {k: r.get(k) for k in SAME} for r in records}


def test_ray_gives_the_records_of_one_process_and_resumes(files, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cells = []
    for i, (scene, _) in enumerate(shapes.questions("test", 300, 6)):
        if i % 2:  # Hugging Face's Image struct: these rows by path (the actors open them) ...
            scene.image().save(images / f"scene{i}.png")
            cells.append({"bytes": None, "path": f"images/scene{i}.png"})
        else:  # ... these by their bytes (they travel in the dataset)
            buf = io.BytesIO()
            scene.image().save(buf, format="PNG")
            cells.append({"bytes": buf.getvalue(), "path": None})
    cells.append({"bytes": b"not an image", "path": None})
    table = pa.table({"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "question": [shapes.DESCRIBE, "How many shapes are there?"] * 3 + ["Hi?"]})
    source = tmp_path / "data.parquet"
    pq.write_table(table, source)
    args = [str(files[0].parent), str(source), "--temp", "0", "--max-tokens", str(MAX_TOKENS)]

    one = tmp_path / "one.jsonl"
    p = run_cli("batch", *args, "-o", str(one), "--parallel", "2", "--threads", "2")
    assert p.returncode == 1, p.stderr  # the row that is not an image
    want = same(read(one))
    assert len(want) == 7 and sum(r["error"] is not None for r in want.values()) == 1

    # Ray resumes an OUT another run began: two answers are there already (the error record is Ray's to write)
    out = tmp_path / "ray.jsonl"
    answered = [line for line in one.read_text().splitlines() if json.loads(line).get("error") is None]
    out.write_text("".join(line + "\n" for line in answered[:2]))
    before = ray_processes()
    p = run_cli("batch", *args, "-o", str(out), "--resume", "--ray", "--workers", "2", "--threads", "1",
                timeout=240)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "5 records written" in p.stderr, p.stderr
    got = read(out)
    assert len(got) == 7 and same(got) == want  # every record once, each the one process's
    deadline = time.monotonic() + 60
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, "Ray's processes outlived the run"


def test_ray_settings_fail_in_one_line_before_anything_starts(files, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    next(iter(shapes.questions("test", 1, 1)))[0].image().save(images / "a.png")
    base = [str(files[0].parent), str(images), "--prompt", "Hi?", "-o", str(tmp_path / "out.jsonl")]
    one_error_line(run_cli("batch", *base, "--workers", "2"), "--workers is for --ray")
    one_error_line(run_cli("batch", *base, "--ray", "--workers", "0"), "--workers must be from 1")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    line = one_error_line(run_cli("batch", *base, "--ray-address", f"127.0.0.1:{port}"), "cannot join the Ray cluster")
    assert time.monotonic() - t0 < 60, line  # not Ray's minutes of retries
    one_error_line(run_cli("batch", *base, "--ray-address", "nowhere"), "not auto or host:port")
    assert not (tmp_path / "out.jsonl").exists()  # nothing created


ACTOR_WITHOUT_FILES = r"""
import shutil, sys
from pathlib import Path
from llava_gguf.batch import Cluster, run
from llava_gguf.errors import LlavaGgufError
model, images, away = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
with run(model, images, prompt="Hi?", ray=Cluster(workers=1, threads=1)) as records:
    mmproj = next(model.glob("mmproj-*.gguf"))
    shutil.move(mmproj, away)  # as on a node where the files are not: the driver checked them, the actor cannot
    try:
        list(records)
    except LlavaGgufError as e:
        print(e.one_line())
    finally:
        shutil.move(away, mmproj)
"""


def test_an_actor_without_the_model_files_is_one_line(files, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in files:
        (model / f.name).symlink_to(f)
    images = tmp_path / "images"
    images.mkdir()
    next(iter(shapes.questions("test", 1, 1)))[0].image().save(images / "a.png")
    before = ray_processes()
    p = subprocess.run([sys.executable, "-c", ACTOR_WITHOUT_FILES, str(model), str(images), str(tmp_path / "away")],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "the Ray run failed" in lines[0] and "mmproj" in lines[0], p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    deadline = time.monotonic() + 60
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, "Ray's processes outlived the run"
