"""`llava-gguf serve` as a command: bad options and files are one line and exit 1 before anything listens; a
port in use is said as such; SIGTERM stops a serving process cleanly (exit 0, nothing left listening)."""
from __future__ import annotations

import json
import signal
import socket
import urllib.request

import pytest

from support import one_error_line, run_cli, serve_process


def test_bad_path_and_options_are_one_line(tmp_path, shipped_gguf):
    one_error_line(run_cli("serve", str(tmp_path / "missing"), "--port", "0", timeout=60), "does not exist")
    one_error_line(run_cli("serve", str(shipped_gguf), "--port", "0", "--parallel", "0", timeout=60), "--parallel")
    one_error_line(run_cli("serve", str(shipped_gguf), "--port", "70000", timeout=60), "--port")
    one_error_line(run_cli("serve", str(shipped_gguf), "--port", "0", "--media-root", str(tmp_path / "nope"),
                           timeout=60), "--media-root")
    one_error_line(run_cli("serve", str(shipped_gguf), "--port", "0", "--api-key", "short", timeout=60), "key")
    # serve has no --model: with several language models, the LLM's own file is given as PATH
    several = tmp_path / "several"
    several.mkdir()
    for f in shipped_gguf.glob("*.gguf"):
        (several / f.name).symlink_to(f)
    llm = next(f for f in shipped_gguf.glob("*.gguf") if not f.name.startswith("mmproj"))
    (several / llm.name.replace("F16", "F32")).symlink_to(llm)
    line = one_error_line(run_cli("serve", str(several), "--port", "0", timeout=60), "several language models", "PATH")
    assert "--model" not in line


def test_port_in_use_is_one_line(shipped_gguf):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = run_cli("serve", str(shipped_gguf), "--port", str(port), timeout=60)
    one_error_line(p, f"127.0.0.1:{port}", "--port")


def test_a_model_that_cannot_load_exits_1_and_health_said_why(tmp_path, shipped_gguf):
    """The socket is bound before the model loads (GET /health answers "loading"); a model llama.cpp refuses
    ends the process with one line and exit 1."""
    llm = next(shipped_gguf.glob("shapes-*.gguf"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(llm.read_bytes()[: llm.stat().st_size // 2])  # truncated: the header is fine
    mmproj = next(shipped_gguf.glob("mmproj-*.gguf"))
    p = run_cli("serve", str(broken), "--mmproj", str(mmproj), "--port", "0", timeout=120)
    assert p.returncode == 1
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr


def test_sigterm_ends_open_streams_and_exits_0(tiny, converted):
    """SIGTERM with an answer streaming: the stream ends with an error event and [DONE] (not a cut
    connection), the process closes its engine and exits 0 (uvicorn's own handler would kill it: 143), and
    nothing listens any more."""
    llm, mmproj = converted(tiny(), "f16")
    with serve_process(llm, "--mmproj", str(mmproj), "--ctx", "8192", "--parallel", "1", "--grace", "0") as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}],
                           "max_tokens": 8000, "temperature": 1.0, "seed": 1, "stream": True}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            first = r.readline()
            assert first.startswith(b"data: ")
            url.proc.send_signal(signal.SIGTERM)
            rest = r.read().decode()  # the server ends the stream itself, within its grace period
        events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"] == "the server is shutting down"
        assert url.proc.wait(30) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
