"""Bad input: a one-line error naming the problem, a non-zero exit, and nothing left in OUTDIR."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import assert_clean_failure, run_cli


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.fixture()
def base(tiny, tmp_path):
    return _copy(tiny(), tmp_path / "ckpt")


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(tmp_path / "nope"), "-o", str(out)), out, "does not exist")


def test_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(tmp_path / "empty"), "-o", str(out)), out, "empty")


def test_plain_llama_checkpoint(base, tmp_path):
    _edit_config(base, architectures=["LlamaForCausalLM"], model_type="llama")
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "not a LLaVA checkpoint")


def test_clip_checkpoint(base, tmp_path):
    _edit_config(base, architectures=["CLIPVisionModel"], model_type="clip_vision_model")
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "not a LLaVA checkpoint")


def test_unknown_architecture(base, tmp_path):
    _edit_config(base, architectures=["FrobnicatorForVision"], model_type="frob")
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "unsupported architecture")


def test_unknown_text_model(base, tmp_path):
    cfg = json.loads((base / "config.json").read_text())
    _edit_config(base, text_config={**cfg["text_config"], "model_type": "qwen2"})
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "unsupported text model type 'qwen2'",
                         "llama, mistral")
    p = run_cli("inspect", str(base))
    assert p.returncode == 1 and "unsupported text model type" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_corrupt_config(base, tmp_path):
    (base / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration",')
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "config.json", "not valid JSON")


@pytest.mark.parametrize("changes,words", [
    ({"vision_feature_select_strategy": "full"}, ("vision_feature_select_strategy", "full")),
    ({"vision_feature_layer": [-2, -5]}, ("vision_feature_layer",)),
    ({"vision_feature_layer": -40}, ("out of range",)),
])
def test_unsupported_feature_selection(base, tmp_path, changes, words):
    _edit_config(base, **changes)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, *words)


def test_truncated_safetensors(base, tmp_path):
    f = base / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "truncated")


def test_corrupt_safetensors_header(base, tmp_path):
    f = base / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "not a valid safetensors")


def test_missing_shard(tiny, tmp_path):
    ckpt = _copy(tiny(shards=3, layout="transformers-4.52"), tmp_path / "ckpt")
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "model-00002-of-00003", "missing")


def test_existing_output_needs_force(tiny, tmp_path):
    ckpt = tiny()
    out = tmp_path / "out"
    assert run_cli("convert", str(ckpt), "-o", str(out)).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    p = run_cli("convert", str(ckpt), "-o", str(out))
    assert p.returncode != 0 and "already exists" in p.stderr and "--force" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert {q.name: q.stat().st_mtime_ns for q in out.iterdir()} == before  # untouched
    assert run_cli("convert", str(ckpt), "-o", str(out), "--force").returncode == 0
    assert sorted(before) == sorted(q.name for q in out.iterdir())


def test_unwritable_outdir(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    p = run_cli("convert", str(tiny()), "-o", str(out))
    assert_clean_failure(p, out, "cannot create output directory")
    p = run_cli("convert", str(tiny()), "-o", str(blocker))
    assert p.returncode != 0 and "not a directory" in p.stderr
    assert blocker.read_text() == "not a directory"


def test_interrupted_conversion_leaves_nothing(tiny, tmp_path):
    """SIGINT while tensors are being written: no .gguf, no .partial, no new directory."""
    ckpt = tiny(text_hidden=1024, text_ff=2816, text_layers=4, vocab_size=8192)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "llava_gguf", "convert", str(ckpt), "-o", str(out),
                             "--outtype", "q8_0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        partials = list(out.glob("*.partial")) if out.exists() else []
        if len(partials) == 2 and any(p.stat().st_size > 2**20 for p in partials):  # tensors are being written
            break
        if proc.poll() is not None:
            pytest.fail("conversion finished before it could be interrupted: " + proc.stderr.read())
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_outtype(tiny, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(tiny()), "-o", str(out), "--outtype", "q3_x"), out, "outtype")


@pytest.mark.parametrize("args,words", [
    (("convert",), ("missing argument",)),
    (("convert", "/tmp", "-o"), ("requires an argument",)),
    (("frobnicate",), ("no such command",)),
])
def test_usage_errors_are_one_line(args, words, tmp_path):
    p = run_cli(*args)
    assert_clean_failure(p, tmp_path / "none", *words)


def _one_line(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_outside_the_checkpoint_is_refused(tiny, tmp_path, where):
    """Item 2: a shard named `../elsewhere/x.safetensors` (or an absolute path) in the index is never read."""
    ckpt = _copy(tiny(shards=3, layout="transformers-4.52"), tmp_path / "ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = "model-00002-of-00003.safetensors"
    os.replace(ckpt / shard, elsewhere / shard)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    target = "../elsewhere/" + shard if where == "parent" else str(elsewhere / shard)
    index["weight_map"] = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "outside the checkpoint directory",
                         target)
    _one_line(run_cli("inspect", str(ckpt)), "outside the checkpoint directory")


def test_shards_as_symlinks_like_the_hub_cache(tiny, tmp_path):
    """Symlinks inside the checkpoint stay fine: the Hugging Face cache's snapshots link to ../../blobs."""
    src = tiny(shards=3, layout="transformers-4.52")
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    p = run_cli("convert", str(snap), "-o", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr


def test_malicious_pickle_runs_nothing(base, tmp_path):
    """Item 3: a pytorch_model.bin whose __reduce__ would run a command is refused; the command never runs."""
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(base / "config.json", ckpt / "config.json")
    torch.save({"language_model.model.embed_tokens.weight": torch.zeros(4, 4), "x": Payload()},
               ckpt / "pytorch_model.bin")
    assert not marker.exists()  # saving does not run it
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "holds more than tensors")
    _one_line(run_cli("inspect", str(ckpt)), "holds more than tensors")
    assert not marker.exists()


def _safetensors_with_header(path: Path, header: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def test_deeply_nested_safetensors_header(base, tmp_path):
    """Item 8: JSON nested deeper than Python's stack (a RecursionError traceback before): one line, for
    convert and inspect; a header longer than safetensors' own cap is refused before it is read."""
    depth = 200_000
    _safetensors_with_header(base / "model.safetensors", b'{"a":' + b"[" * depth + b"]" * depth + b"}")
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "not a valid safetensors",
                         "nested too deeply")
    _one_line(run_cli("inspect", str(base)), "not a valid safetensors", "nested too deeply")
    with open(base / "model.safetensors", "wb") as f:  # claims 100,000,008 header bytes (sparse file)
        f.write((100_000_008).to_bytes(8, "little"))
        f.truncate(200_000_000)
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "not a valid safetensors",
                         "100000000")


def test_deeply_nested_config(base, tmp_path):
    (base / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "config.json", "nested too deeply")
