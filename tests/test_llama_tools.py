"""Our files in llama.cpp's own llama-mtmd-cli (built by our CMake from the same llama.cpp, linked to our
fixed libmtmd): with no flags every family's converted pair runs, because llama.cpp recognises the chat
template we write; with --jinja (the model's own template, rendered exactly) its greedy answer equals
`llava-gguf chat`'s — with the two differences between the tools' defaults spelt out below."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import gguf
import pytest

from support import run_cli
from llava_gguf.convert.template import llama_cpp_layout
from llava_gguf.native import library as native
from devkit.tiny import make_tiny_liuhaotian, sample_image

PROMPT = "What is in the image?"
# Two differences in llama-mtmd-cli's defaults, not in the files:
# - given `-p TEXT`, it puts its media marker straight before TEXT; llava-hf's template puts "<image>\n" there.
#   Writing the marker with the newline into the prompt gives the model's own prompt, token for token.
# - its repeat penalty defaults to 1.0, `llava-gguf chat`'s to 1.1; both penalise the last 64 generated tokens
#   with the same libllama sampler, so passing 1.1 makes them equal.
MTMD_PROMPT = "<__media__>\n" + PROMPT
SAME_SAMPLING = ("--repeat-penalty", "1.1")

# family -> (tiny checkpoint spec, outtype, llama.cpp's built-in layout for the template in the GGUF)
FAMILIES = {
    "llava-1.5": (dict(), "f16", "vicuna"),
    "llava-1.5-transformers<4.52": (dict(layout="transformers<4.52"), "f16", "vicuna"),
    "llava-1.5-transformers-4.52": (dict(layout="transformers-4.52"), "f16", "vicuna"),
    "bakllava": (dict(text_model="mistral"), "f16", "vicuna"),
    "llava-1.6-vicuna": (dict(anyres=True), "f16", "vicuna"),
    "llava-1.6-yi-chatml": (dict(anyres=True, tokenizer="chatml"), "f16", "chatml"),
    "llava-next-llama3": (dict(tokenizer="llama3", anyres=True), "f32", "llama3"),
    "liuhaotian": (None, "f16", "vicuna"),  # no template in the checkpoint: the family's is written
}
# What llama.cpp's built-in layouts make of `-p PROMPT` with one image (llama-chat.cpp): the marker glued to
# the text, and the layout's own separators — not llava-hf's "USER: <image>\nPROMPT ASSISTANT:".
BUILTIN_PROMPTS = {
    "vicuna": f"USER: <__media__>{PROMPT}\nASSISTANT:",
    "chatml": f"<|im_start|>user\n<__media__>{PROMPT}<|im_end|>\n<|im_start|>assistant\n",
    "llama3": f"<|start_header_id|>user<|end_header_id|>\n\n<__media__>{PROMPT}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
# libmtmd lays out LLaVA-1.6 images LLaVA-UHD style (overview + slices, no image_newline, no unpadding);
# our runtime computes transformers' rows itself (runtime/anyres.py). Same prompt text, other image rows
# (tiny 1.6, 112x112 image: 98 positions in llama-mtmd-cli, 170 in ours, as in transformers): the greedy
# answers of tiny random models part after a token or two.
ANYRES = {"llava-1.6-vicuna", "llava-1.6-yi-chatml", "llava-next-llama3"}


@pytest.fixture(scope="module")
def tool() -> Path:
    return native.configure().tools_dir / "llama-mtmd-cli"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "img.png"
    sample_image(112, seed=5).save(path)
    return path


@pytest.fixture(scope="module")
def pairs(tiny, converted, tmp_path_factory):
    """family -> (llm, mmproj), converted on first use."""
    from llava_gguf.convert import convert_checkpoint

    done: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in done:
            spec, outtype, _ = FAMILIES[family]
            if spec is None:
                work = tmp_path_factory.mktemp("liuhaotian")
                lh = make_tiny_liuhaotian(tiny(dtype="float16"), work / "llava-v1.5-tiny", work / "clip",
                                          weights_format="safetensors")
                r = convert_checkpoint(lh, work / "out", outtype=outtype, clip=work / "clip")
                done[family] = (r.llm, r.mmproj)
            else:
                done[family] = converted(tiny(**spec), outtype)
        return done[family]

    return get


def run_mtmd(tool: Path, llm: Path, mmproj: Path, image: Path, prompt: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(tool), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(image), "-p", prompt,
                           "-n", "8", "--temp", "0", "-t", "2", *flags], capture_output=True, timeout=120)


def mtmd_answer(tool: Path, llm: Path, mmproj: Path, image: Path, prompt: str, *flags: str,
                expect: str | None = None) -> tuple[str, str]:
    """llama-mtmd-cli's answer (exit 0 asserted) and the prompt it formatted (from its debug log). It
    prints through llama.cpp's asynchronous logger, which it leaks on purpose at exit (common/log.cpp,
    llama.cpp #22142): on a loaded machine the end of the answer can be lost. A run whose answer is empty,
    or a strict prefix of `expect`, is run again."""
    for _ in range(3):
        p = run_mtmd(tool, llm, mmproj, image, prompt, "-v", *flags)
        err = p.stderr.decode("utf-8", errors="replace")
        assert p.returncode == 0, err[-2000:]
        answer = p.stdout.decode("utf-8", errors="replace").strip()
        if answer and (expect is None or answer == expect or not expect.startswith(answer)):
            break
    formatted = re.search(r" D formatted_chat\.prompt: (.*?)\n\d+\.\d+\.\d+\.\d+ [DIWE] ", err, re.S)
    assert formatted, err[-2000:]
    return answer, formatted.group(1)


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd (Linux) shows which libmtmd the loader picks")
def test_llama_mtmd_cli_links_our_fixed_libmtmd(tool):
    """The same fixed libmtmd as our runtime, so both see identical image embeddings."""
    libs = native.configure()
    p = subprocess.run(["ldd", str(tool)], capture_output=True, text=True, timeout=60)
    line = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("libmtmd.so"))
    assert Path(line.split("=>")[1].split("(")[0].strip()).resolve() == (libs.mtmd_dir / "libmtmd.so").resolve()
    assert libs.variant == "fixed"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_in_llama_mtmd_cli_without_flags(family, pairs, tool, image):
    llm, mmproj = pairs(family)
    # no --jinja, no --chat-template: llama.cpp's built-in layout (llava-1.5 files aborted with SIGABRT)
    answer, formatted = mtmd_answer(tool, llm, mmproj, image, PROMPT)
    assert answer
    layout = FAMILIES[family][2]
    assert formatted == BUILTIN_PROMPTS[layout]
    assert llama_cpp_layout(gguf.GGUFReader(llm).fields["tokenizer.chat_template"].contents()) == layout


@pytest.mark.parametrize("family", list(FAMILIES))
def test_jinja_prompt_and_answer_equal_our_chat(family, pairs, tool, image):
    """--jinja renders the GGUF's template as our runtime does: the same prompt text, hence the same
    tokens; with the same image rows (every family but LLaVA-1.6's) the same greedy answer."""
    from llava_gguf import LLaVA
    from llava_gguf.runtime.prompt import Message

    llm, mmproj = pairs(family)
    with LLaVA(llm, mmproj, n_threads=2) as m:
        ours_prompt = m.render([Message("user", PROMPT, n_images=1)])
    p = run_cli("chat", str(llm.parent), "--model", str(llm), "--mmproj", str(mmproj), "--image", str(image),
                "--prompt", PROMPT, "--temp", "0", "--max-tokens", "8")
    assert p.returncode == 0, p.stderr
    ours = p.stdout.strip()
    assert ours
    answer, formatted = mtmd_answer(tool, llm, mmproj, image, MTMD_PROMPT, "--jinja", *SAME_SAMPLING, expect=ours)
    assert formatted == ours_prompt.replace("<image>", "<__media__>")
    if family not in ANYRES:
        assert answer == ours


def test_shipped_model_in_llama_mtmd_cli(tool, tmp_path):
    """The shipped model (llava-hf's template in its chat_template.json) answers through llama-mtmd-cli
    with no flags, and with --jinja and its own prompt as `chat` does."""
    from llava_gguf.demo import shapes
    from llava_gguf.convert import convert_checkpoint

    src = Path(__file__).resolve().parents[1] / "llava_gguf" / "data" / "shapes-llava"
    r = convert_checkpoint(src, tmp_path / "out")
    scene, question = next((sc, q) for sc, q in shapes.questions("test", 0, 20) if q.kind == "color")
    img = tmp_path / "scene.png"
    scene.image().save(img)
    builtin, _ = mtmd_answer(tool, r.llm, r.mmproj, img, question.text)
    assert builtin.lower().rstrip(".") == question.answer
    p = run_cli("chat", str(tmp_path / "out"), "--image", str(img), "--prompt", question.text, "--temp", "0",
                "--max-tokens", "8")
    assert p.returncode == 0, p.stderr
    answer, _ = mtmd_answer(tool, r.llm, r.mmproj, img, "<__media__>\n" + question.text, "--jinja", *SAME_SAMPLING,
                            expect=p.stdout.strip())
    assert answer == p.stdout.strip()
    shutil.rmtree(tmp_path / "out")
