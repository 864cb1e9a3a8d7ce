"""`llava-gguf chat` through the real CLI: one-shot answers equal to the API's and to llama.cpp's own
llama-mtmd-cli, --json, stdin images, the interactive session in a pseudo-terminal, and bad images."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from support import run_cli
from llava_gguf import LLaVA
from llava_gguf.native import library as native

PROMPT = "What is in the image?"
# llava-hf's template for one user turn, in the form llama-mtmd-cli's --jinja takes (the marker it puts
# before the text becomes llava-hf's "<image>\n")
MTMD_TEMPLATE = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}USER: "
                 "{{ m['content'] | replace('<__media__>', '<__media__>\n') }} ASSISTANT:{%- endif -%}{%- endfor -%}")


@pytest.fixture(scope="module")
def outdir(tiny, converted):
    llm, _ = converted(tiny(), "f16")
    return llm.parent


def test_one_shot_equals_the_api_and_llama_mtmd_cli(outdir, image_png):
    greedy = dict(temperature=0, max_tokens=12, repeat_penalty=1.0)
    with LLaVA.load(outdir) as m:
        api = m.generate_from_image(image_png, PROMPT, **greedy)
        llm, mmproj = m.model_path, m.mmproj_path
    assert api.strip()
    p = run_cli("chat", str(outdir), "--image", str(image_png), "--prompt", PROMPT, "--temp", "0", "--max-tokens", "12",
                "--repeat-penalty", "1.0")
    assert p.returncode == 0, p.stderr
    assert p.stdout == api + "\n"  # stdout carries exactly the answer
    assert p.stderr == ""  # llama.cpp's logs hidden
    tool = native.configure().tools_dir / "llama-mtmd-cli"
    ref = subprocess.run([str(tool), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(image_png), "-p", PROMPT,
                          "--temp", "0", "-n", "12", "--jinja", "--chat-template", MTMD_TEMPLATE, "-t", "2"],
                         capture_output=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert ref.stdout.decode("utf-8", errors="replace").strip() == api.strip()


def test_json_and_an_image_from_stdin(outdir, image_png):
    with LLaVA.load(outdir) as m:
        api = m.generate_from_image(image_png, PROMPT, temperature=0, max_tokens=6)
    p = subprocess.run([sys.executable, "-m", "llava_gguf", "chat", str(outdir), "--image", "-", "--prompt", PROMPT,
                        "--temp", "0", "--max-tokens", "6", "--json"], input=image_png.read_bytes(),
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert r["text"] == api.strip()
    assert 1 <= r["generated_tokens"] <= 6 and r["images_encoded"] == 1 and r["prompt_tokens"] > 64
    assert r["first_token_seconds"] > 0


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_bad_images_are_one_line(outdir, image_png, tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_bomb(40000, 40000))
    (tmp_path / "cut.png").write_bytes(image_png.read_bytes()[:200])
    (tmp_path / "text.jpg").write_text("hello")
    # an iPhone photo's first bytes; pillow-heif (the optional 'heic' extra) is not in the dev set-up
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    for name, words in [("bomb.png", "too large"), ("cut.png", "damaged"), ("text.jpg", "not an image"),
                        ("missing.png", "does not exist"), ("photo.heic", "llava-gguf[heic]")]:
        p = run_cli("chat", str(outdir), "--image", str(tmp_path / name), "--prompt", "hi")
        assert p.returncode == 1 and words in p.stderr, (name, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stdout == ""


def test_interactive_session_in_a_terminal(outdir, image_png, tmp_path):
    import pexpect

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    child = pexpect.spawn(sys.executable, ["-m", "llava_gguf", "chat", str(outdir), "--temp", "0",
                                           "--max-tokens", "1000", "--ctx", "4096"],
                          env=env, encoding="utf-8", timeout=120)
    try:
        child.expect_exact("> ")
        child.sendline(f"/image {image_png}")
        child.expect_exact("image attached")
        child.expect_exact("> ")
        child.sendline("What is in the image?")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"prompt: \d+ tokens \(0 from the cache, \d+ decoded, 1 image\(s\) encoded\)")
        child.expect_exact("> ")
        child.sendline("And the colours?")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"prompt: \d+ tokens \([1-9]\d* from the cache, \d+ decoded, 0 image\(s\) encoded\)")
        child.expect_exact("> ")
        child.sendline(f"/save {tmp_path / 't.json'}")
        child.expect_exact("saved")
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact("conversation reset")
        child.expect_exact("> ")
        child.sendline("Tell me a very long story about it.")
        child.expect(r"Tell me a very long story about it\.\r\n\S")  # the answer has started streaming
        child.sendintr()  # Ctrl-C: stops the answer, not the session
        child.expect_exact("(stopped)")
        child.expect_exact("> ")
        child.sendline("/help")
        child.expect_exact("/quit")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [t["role"] for t in saved["turns"]] == ["user", "assistant", "user", "assistant"]
    assert saved["turns"][0]["images"][0]["path"] == str(image_png)


def test_the_session_goes_on_after_bad_text_and_refused_saves(outdir, tmp_path):
    """A line that is not UTF-8 is one error line for that turn (not a traceback that ends the session);
    /save refuses an existing file (one line) and replaces it with --force."""
    import pexpect

    transcript = tmp_path / "t.json"
    transcript.write_text("keep me")
    # LC_ALL=C: the terminal's bytes reach Python surrogate-escaped, as on a misconfigured terminal
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "LC_ALL": "C", "LANG": "C"}
    child = pexpect.spawn(sys.executable, ["-m", "llava_gguf", "chat", str(outdir), "--temp", "0",
                                           "--max-tokens", "3"], env=env, timeout=120)
    try:
        child.expect_exact(b"> ")
        child.send(b"what \xff\xfe is it\r")
        child.expect_exact(b"error: the prompt is not valid text: character 6 is the byte 0xFF, which is not UTF-8")
        child.expect_exact(b"> ")
        child.sendline(b"what is it")  # the session goes on, and the bad line left no turn behind
        child.expect(rb"what is it\r\n\S+")
        child.expect_exact(b"> ")
        child.sendline(f"/save {transcript}".encode())
        child.expect_exact(b"error: ")
        child.expect_exact(b"> ")
        child.sendline(f"/save --force {transcript}".encode())
        child.expect_exact(f"(saved {transcript})".encode())
        child.expect_exact(b"> ")
        child.sendline(b"/help")
        child.expect_exact(b"/save [--force] FILE")
        child.expect_exact(b"> ")
        child.sendline(b"/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    saved = json.loads(transcript.read_text())
    assert [t["role"] for t in saved["turns"]] == ["user", "assistant"]
    assert saved["turns"][0]["text"] == "what is it"
