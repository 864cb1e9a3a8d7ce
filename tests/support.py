"""Test helpers, the one module tests import them from (fixtures are in conftest.py): the real CLI in a
child process, failure assertions, GGUF rewriting through gguf-py alone, and the transformers reference
(fp32) our runtime is compared with."""
from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from devkit.tiny import sample_image
from llava_gguf.families.llava15 import vicuna_prompt_segments
from llava_gguf.checks.reference import image_features, load_hf_model, pixel_values
from llava_gguf.gguf.mmproj_defects import FEATURE_LAYER_KEY
from llava_gguf.errors import LlavaGgufError


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a child process."""
    return subprocess.run([sys.executable, "-m", "llava_gguf", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _die_with_parent() -> None:
    # the server is killed with the test process, even when pytest itself is killed
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerURL(str):
    """The base URL of a server serve_process started ("http://127.0.0.1:PORT"), with its process."""

    proc: subprocess.Popen


@contextlib.contextmanager
def serve_process(path, *args: str, env: dict | None = None, timeout: float = 120) -> Iterator[ServerURL]:
    """`llava-gguf serve PATH ARGS` as a real child process on a free loopback port: yields its base URL
    ("http://127.0.0.1:PORT", a str with the process as `.proc`) once it listens and its model is loaded;
    stopped (SIGTERM, then SIGKILL) on exit. Its stderr log is attached to a failure."""
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "llava_gguf", "serve", str(path), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=_die_with_parent)
    url: list[str] = []
    ready = threading.Event()

    def read_stdout() -> None:  # keeps the pipe drained for the server's whole life
        for line in proc.stdout:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found and not url:
                url.append(found.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        ready.wait(timeout)
        if not url:
            proc.kill()
            proc.wait(10)
            log.seek(0)
            pytest.fail(f"the server did not start (exit {proc.returncode}): {log.read()[-3000:]}")
        served = ServerURL(url[0])
        served.proc = proc
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        reader.join(10)
        proc.stdout.close()
        log.close()
        os.unlink(log.name)


def image_uri(image, fmt: str = "PNG") -> str:
    """A PIL image as the data: URI an OpenAI client sends."""
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user_turn(text: str, *urls: str) -> dict:
    """An OpenAI user message: its image URLs first (as LLaVA was trained), then the text."""
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
            + [{"type": "text", "text": text}]}


def wait_for_temporaries(proc: subprocess.Popen, outdir: Path, *, count: int = 1, min_size: int = 1,
                         timeout: float = 120) -> None:
    """Wait until `proc` (a writing command) has `count` hidden temporaries in `outdir`, one of them at least
    `min_size` bytes: the moment to kill, interrupt or race it. Fails if the run ends (or never writes) first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        temps = list(outdir.glob("*.partial")) if outdir.exists() else []
        try:
            if len(temps) >= count and any(t.stat().st_size >= min_size for t in temps):
                return
        except FileNotFoundError:  # a temporary renamed or removed meanwhile
            pass
        if proc.poll() is not None:
            pytest.fail("the run ended before its temporaries were seen: " + proc.stderr.read())
        time.sleep(0.005)
    pytest.fail("the run never started writing")


def assert_clean_failure(p: subprocess.CompletedProcess, outdir: Path, *words: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert not outdir.exists() or not any(outdir.iterdir()), list(outdir.iterdir())


def legacy_mmproj(mmproj: Path, dest: Path) -> Path:
    """An mmproj without its feature layer: something `repair` rewrites."""
    return rewrite_gguf(mmproj, dest, drop_keys=(FEATURE_LAYER_KEY,))


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    """`fn(*args, **kwargs)` raises a LlavaGgufError matching `match`, said in one line; its text."""
    with pytest.raises(LlavaGgufError, match=match) as e:
        fn(*args, **kwargs)
    text = str(e.value)
    assert "\n" not in text
    return text


def one_error_line(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def prompt_ids(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return vicuna_prompt_segments(lambda t: tok.encode(t, add_special_tokens=False), tok.bos_token_id,
                                  "What is in the image?")


def hf_reference(ckpt, image, n_greedy, model=None):
    """Image rows, first-step logits and greedy tokens from transformers (fp32); `model`: a loaded (and
    possibly altered) model of `ckpt` instead of the checkpoint as saved."""
    model = model if model is not None else load_hf_model(ckpt)
    pixels = pixel_values(ckpt, image)
    feats = image_features(model, pixels)
    before, after = prompt_ids(ckpt)
    ids = before + [model.config.image_token_id] * feats.shape[0] + after
    first_logits, tokens = hf_greedy(model, ids, n_greedy, pixel_values=pixels)
    return feats, first_logits, tokens, (before, after)


def hf_greedy(model, ids, n_greedy, **image_inputs):
    """transformers' first-step logits and greedy tokens for prompt `ids` with the image inputs."""
    tokens, first_logits = [], None
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **image_inputs, use_cache=True)
        for step in range(n_greedy):
            logits = out.logits[0, -1].float()
            if step == 0:
                first_logits = logits.numpy()
            nxt = int(logits.argmax())
            tokens.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return first_logits, tokens


def ours(llm, mmproj, image, before, after, n_greedy):
    from llava_gguf import LLaVA

    with LLaVA(llm, mmproj, n_threads=2) as m:
        feats = m.embed_image(image)
        first, tokens = ours_greedy(m, image, before, after, n_greedy)
    return feats, first, tokens


def ours_greedy(m, image, before, after, n_greedy):
    """Our runtime's first-step logits and greedy tokens for `before` + image + `after`, from an empty cache."""
    m.reset()
    m.eval_tokens(before)
    m.eval_image(image)
    m.eval_tokens(after)
    first = m.last_logits()
    tokens = []
    logits = first
    for _ in range(n_greedy):
        nxt = int(np.argmax(logits))
        tokens.append(nxt)
        m.eval_tokens([nxt])
        logits = m.last_logits()
    return first, tokens


def crop_image(w, h):
    """A non-square test image, w x h."""
    return sample_image(max(w, h), seed=w + h).crop((0, 0, w, h))


def hf_next(ckpt):
    from transformers import LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return (LlavaNextForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval(),
            LlavaNextImageProcessorPil.from_pretrained(ckpt))


def hf_rows(model, proc, img):
    inp = proc(images=img, return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inp["pixel_values"], image_sizes=inp["image_sizes"])
    rows = out.pooler_output
    return (rows if torch.is_tensor(rows) else rows[0]).numpy(), inp


def rewrite_gguf(src: Path, dest: Path, *, drop_keys=(), set_keys: dict | None = None,
                 edit: Callable | None = None, drop_tensors=(), add_tensors: dict | None = None) -> Path:
    """`src` written again as `dest`: keys dropped, set ({key: (value, type[, sub_type])}) or edited
    (`edit(name, value) -> value`), tensors dropped or added ({name: numpy array})."""
    set_keys = set_keys or {}
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dest, arch=r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name in drop_keys \
                or f.name in set_keys:
            continue
        t = f.types[0]
        value = edit(f.name, f.contents()) if edit else f.contents()
        w.add_key_value(f.name, value, t, sub_type=f.types[-1] if t == gguf.GGUFValueType.ARRAY else None)
    for key, (value, t, *sub) in set_keys.items():
        w.add_key_value(key, value, t, sub_type=sub[0] if sub else None)
    for t in r.tensors:
        if t.name not in drop_tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, arr in (add_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def hub_stub():
    """A loopback Hugging Face Hub stand-in (devkit/hubstub.py), serving once entered (`with hub_stub() as
    hub:`); `hub.env(dir)` points a child process's huggingface_hub at it with its cache under `dir`."""
    from devkit.hubstub import HubStub  # here: only the Hub tests need it

    return HubStub()
