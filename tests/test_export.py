"""`export ollama` and `export lmstudio` on real converted pairs of every chat format we support.

The Modelfile is read back with Ollama's own parser (ported in devkit/gotemplate.py) and its TEMPLATE rendered,
with the values Ollama's chat hands it (images tagged `[img-N]` before the text), by a renderer of the Go
text/template subset it uses: for each conversation the result, the tags put back as our image placeholder,
is exactly the prompt our runtime renders for that model. The LM Studio layout is checked on disk (names,
hard links by inode, copies across file systems)."""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
from pathlib import Path

import gguf
import pytest

from devkit.gotemplate import ollama_generate_values, ollama_values, parse_modelfile, render
from llava_gguf import LLaVA
from llava_gguf.errors import LlavaGgufError
from llava_gguf.export import default_models_dir, export_lmstudio, export_ollama
from llava_gguf.export.chat_formats import GENERATE_IMAGES, MISTRAL_JINJA
from llava_gguf.export.lmstudio import layout_names, place_file
from llava_gguf.export.ollama import context_for
from llava_gguf.export.source import load_source
from llava_gguf.runtime.prompt import IMAGE_PLACEHOLDER, Message
from support import one_error_line, one_line_error, rewrite_gguf, run_cli

FORMATS = {"vicuna": "Vicuna", "mistral": "Mistral", "chatml": "ChatML", "llama3": "LLaMA-3"}

# (role, text, images): one turn, a system prompt, three user turns, two images, text only
CONVERSATIONS = [
    [("user", "What is in the image?", 1)],
    [("system", "Answer in one word."), ("user", "What shape?", 1)],
    [("user", "Describe it.", 1), ("assistant", "A red circle."), ("user", "And the colour?"),
     ("assistant", "Red."), ("user", "Thanks. The size?")],
    [("system", "Be brief."), ("user", "Compare them. ünïcödé 日本語", 2), ("assistant", "Same."),
     ("user", "Sure?", 1)],
    [("user", "Hello there")],
]


def _copy_pair(llm: Path, mmproj: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in (llm, mmproj):
        shutil.copy2(p, dest / p.name)
    return dest


@pytest.fixture(scope="module")
def pairs(tiny, converted, tmp_path_factory) -> dict[str, Path]:
    """format -> a directory holding only a converted pair in that chat format (copies: the exports write
    beside them). Mistral: LLaVA-1.6-Mistral's template written into a Vicuna pair's LLM."""
    root = tmp_path_factory.mktemp("export-pairs")
    vicuna = converted(tiny())
    out = {"vicuna": _copy_pair(*vicuna, root / "vicuna"),
           "chatml": _copy_pair(*converted(tiny(tokenizer="chatml", anyres=True), "f16"), root / "chatml"),
           "llama3": _copy_pair(*converted(tiny(tokenizer="llama3", anyres=True), "f32"), root / "llama3")}
    mistral = root / "mistral"
    mistral.mkdir()
    rewrite_gguf(vicuna[0], mistral / "tiny-mistral-F16.gguf",
                 set_keys={"tokenizer.chat_template": (MISTRAL_JINJA, gguf.GGUFValueType.STRING)})
    shutil.copy2(vicuna[1], mistral / "mmproj-tiny-mistral-F16.gguf")
    out["mistral"] = mistral
    return out


def _modelfile(path: Path) -> dict:
    cmds = parse_modelfile(path.read_text())
    params: dict[str, list[str]] = {}
    for name, arg in cmds:
        params.setdefault(name, []).append(arg)
    return params


def _resolve(arg: str, modelfile: Path) -> Path:
    """A FROM argument as Ollama resolves it (parser.go expandPath: relative to the Modelfile's directory)."""
    return Path(arg) if os.path.isabs(arg) else Path(os.path.abspath(modelfile.parent / arg))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_template_renders_exactly_our_prompt(pairs, fmt, tmp_path):
    r = export_ollama(pairs[fmt], tmp_path)
    assert r.chat_format.startswith(FORMATS[fmt])
    assert '"""' not in load_source(pairs[fmt]).chat_format().go_template  # a Modelfile cannot escape it
    mf = _modelfile(r.modelfile)
    llm, mmproj = (_resolve(a, r.modelfile) for a in mf["model"])
    assert (llm, mmproj) == (r.llm, r.mmproj) and mmproj.name.startswith("mmproj-")
    assert "adapter" not in mf and mf["num_ctx"] == [str(r.num_ctx)] and mf["stop"]
    template = mf["template"][0]
    with LLaVA(r.llm, r.mmproj, n_threads=1) as m:
        for conv in CONVERSATIONS:
            conv = [(c[0], c[1], c[2] if len(c) > 2 else 0) for c in conv]
            ours = m.render([Message(role, text, n) for role, text, n in conv])
            theirs = render(template, ollama_values(conv))
            n_images = sum(n for _, _, n in conv)
            # Ollama's runner decodes image N where [img-N] stands: every image once, in order
            assert re.findall(r"\[img-(\d+)\]", theirs) == [str(i) for i in range(n_images)]
            assert re.sub(r"\[img-\d+\]", IMAGE_PLACEHOLDER, theirs) == ours, (fmt, conv)
        # /api/generate: each image a message of its tag alone, merged with the prompt
        for prompt, n, system in (("What is in the image?", 1, None), ("Compare.", GENERATE_IMAGES, "Be brief.")):
            ours = m.render(([Message("system", system)] if system else []) + [Message("user", prompt, n)])
            theirs = render(template, ollama_generate_values(prompt, n, system))
            assert re.sub(r"\[img-\d+\]", IMAGE_PLACEHOLDER, theirs) == ours, (fmt, prompt)
        # an answer to continue (Ollama's prefill): our closed turn, left open
        conv = [("user", "Describe it.", 1), ("assistant", "It is", 0)]
        closed = m.render([Message(r_, t, n) for r_, t, n in conv], add_generation_prompt=False)
        open_turn = re.sub(r"\[img-\d+\]", IMAGE_PLACEHOLDER, render(template, ollama_values(conv)))
        assert closed.startswith(open_turn) and open_turn.endswith("It is")


def test_modelfile_paths_and_context(pairs, tmp_path):
    pair = shutil.copytree(pairs["chatml"], tmp_path / "pair")
    r = export_ollama(pair)  # beside the pair: relative paths
    assert r.modelfile == pair / "Modelfile"
    assert _modelfile(r.modelfile)["model"] == [f"./{r.llm.name}", f"./{r.mmproj.name}"]
    r = export_ollama(pair, tmp_path)  # above it: relative, into the subdirectory
    assert _modelfile(r.modelfile)["model"] == [f"./pair/{r.llm.name}", f"./pair/{r.mmproj.name}"]
    elsewhere = tmp_path / "elsewhere"
    r = export_ollama(pair, elsewhere, name="me/llava:tiny")
    assert _modelfile(r.modelfile)["model"] == [str(r.llm), str(r.mmproj)]
    assert r.command == f"ollama create me/llava:tiny -f {elsewhere / 'Modelfile'}"
    # anyres: the largest grid's rows and the conversation, in a power of two
    source = load_source(pair)
    need = source.image_tokens + 1024
    assert source.image_tokens > 64 and r.num_ctx >= need and r.num_ctx & (r.num_ctx - 1) == 0 and r.num_ctx // 2 < max(need, 4096)
    one_line_error("not a valid Ollama model name", export_ollama, pair, elsewhere, name="bad name!", force=True)


def _with_image_tokens(source, tokens: int, train: int | None):
    files = dataclasses.replace(source.files, anyres=None,
                                mmproj_info=dataclasses.replace(source.files.mmproj_info, image_tokens=tokens),
                                llm_info=dataclasses.replace(source.files.llm_info, context_length=train,
                                                             sliding_window=None))
    return dataclasses.replace(source, files=files)


def test_context_sizes(pairs):
    source = load_source(pairs["vicuna"])
    assert context_for(source) == 4096  # 64 rows: Ollama's own default, never less
    assert context_for(_with_image_tokens(source, 576, 4096)) == 4096  # LLaVA-1.5: 24 x 24
    assert context_for(_with_image_tokens(source, 2928, 32768)) == 4096  # LLaVA-1.6 anyres
    assert context_for(_with_image_tokens(source, 3500, 32768)) == 8192  # a larger grid: the next power of two
    assert context_for(_with_image_tokens(source, 2928, 2048)) == 2048  # never past the training context


def test_ollama_cli_never_overwrites_without_force(pairs, tmp_path):
    pair = shutil.copytree(pairs["vicuna"], tmp_path / "pair")
    p = run_cli("export", "ollama", str(pair))
    assert p.returncode == 0, p.stderr
    assert "ollama create tiny-default:f16 -f " in p.stdout and str(pair / "Modelfile") in p.stdout
    (pair / "Modelfile").write_text("FROM mine\n")
    one_error_line(run_cli("export", "ollama", str(pair)), "already exists", "--force")
    assert (pair / "Modelfile").read_text() == "FROM mine\n"
    p = run_cli("export", "ollama", str(pair), "--force", "--name", "shapes")
    assert p.returncode == 0 and "ollama create shapes" in p.stdout
    assert _modelfile(pair / "Modelfile")["model"][0] == "./tiny-default-F16.gguf"
    assert sorted(x.name for x in pair.iterdir()) == ["Modelfile", "mmproj-tiny-default-F16.gguf",
                                                      "tiny-default-F16.gguf"]  # no temporaries left


def test_both_refuse_a_directory_without_a_pair(pairs, tmp_path):
    empty, llm_only = tmp_path / "empty", tmp_path / "llm-only"
    empty.mkdir()
    llm_only.mkdir()
    shutil.copy2(next(pairs["vicuna"].glob("tiny-*.gguf")), llm_only)
    models = tmp_path / "models"
    for d, words in ((empty, ("no .gguf",)), (llm_only, ("no mmproj",))):
        one_error_line(run_cli("export", "ollama", str(d)), *words)
        one_error_line(run_cli("export", "lmstudio", str(d), "--models-dir", str(models)), *words)
        assert not (d / "Modelfile").exists()
    assert not models.exists()


def test_several_models_ask_to_choose(pairs, tmp_path):
    pair = shutil.copytree(pairs["vicuna"], tmp_path / "pair")
    shutil.copy2(pair / "tiny-default-F16.gguf", pair / "tiny-default-F32.gguf")
    one_error_line(run_cli("export", "ollama", str(pair)), "several language models", "--model")
    p = run_cli("export", "ollama", str(pair), "--model", str(pair / "tiny-default-F32.gguf"), "--json")
    assert p.returncode == 0, p.stderr
    assert _modelfile(pair / "Modelfile")["model"] == ["./tiny-default-F32.gguf", "./mmproj-tiny-default-F16.gguf"]


def test_an_unknown_chat_format_is_refused(pairs, tmp_path):
    pair = tmp_path / "pair"
    pair.mkdir()
    human = ("{% for m in messages %}Human: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
             "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}Bot:")
    rewrite_gguf(pairs["vicuna"] / "tiny-default-F16.gguf", pair / "x-F16.gguf",
                 set_keys={"tokenizer.chat_template": (human, gguf.GGUFValueType.STRING)})
    shutil.copy2(pairs["vicuna"] / "mmproj-tiny-default-F16.gguf", pair / "mmproj-x-F16.gguf")
    one_line_error("renders none of the formats", export_ollama, pair)
    assert not (pair / "Modelfile").exists()
    # LM Studio prompts with the template inside the .gguf: any template is fine there
    r = export_lmstudio(pair, tmp_path / "models")
    assert r.llm.how == "linked" and r.mmproj.path.name == "mmproj-x-F16.gguf"


# ------------------------------------------------------------------ LM Studio
def test_lmstudio_layout_links_and_is_idempotent(pairs, tmp_path):
    pair, models = pairs["llama3"], tmp_path / "models"
    r = export_lmstudio(pair, models)
    src = load_source(pair)
    assert r.folder == models / "llava-gguf" / src.name
    assert sorted(p.name for p in r.folder.iterdir()) == sorted([src.llm.name, src.mmproj.name])
    for placed, source in ((r.llm, src.llm), (r.mmproj, src.mmproj)):
        assert placed.how == "linked" and placed.path.stat().st_ino == source.stat().st_ino
    assert r.mmproj.path.name.startswith("mmproj-") and not r.llm.path.name.startswith("mmproj")
    again = export_lmstudio(pair, models)  # the same files already there: nothing to do
    assert (again.llm.how, again.mmproj.how) == ("already there", "already there")
    # a different file under the name: refused (nothing else touched), replaced with --force
    r.llm.path.unlink()
    r.llm.path.write_bytes(b"something else")
    one_error_line(run_cli("export", "lmstudio", str(pair), "--models-dir", str(models)), "already exists", "--force")
    assert r.llm.path.read_bytes() == b"something else"
    p = run_cli("export", "lmstudio", str(pair), "--models-dir", str(models), "--force")
    assert p.returncode == 0 and "linked" in p.stdout, p.stderr
    assert r.llm.path.stat().st_ino == src.llm.stat().st_ino
    assert sorted(p.name for p in r.folder.iterdir()) == sorted([src.llm.name, src.mmproj.name])


def test_lmstudio_copies_across_file_systems(pairs, tmp_path, monkeypatch):
    pair = pairs["vicuna"]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != pair.stat().st_dev:
        models = shm / f"llava-gguf-test-{os.getpid()}"  # another file system
    else:  # no second file system here: link(2) fails as it does across devices
        def no_link(*args, **kwargs):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(os, "link", no_link)
        models = tmp_path / "models"
    try:
        seen: list[tuple[int, int, str]] = []
        r = export_lmstudio(pair, models, progress=lambda *a: seen.append(a))
        for placed in (r.llm, r.mmproj):
            source = pair / placed.path.name
            assert placed.how == "copied" and placed.path.read_bytes() == source.read_bytes()
            mine = [(d, t) for d, t, name in seen if name == placed.path.name]  # the copy's progress, to the end
            assert mine[-1] == (source.stat().st_size,) * 2 and [d for d, _ in mine] == sorted(d for d, _ in mine)
            assert placed.path.stat().st_ino != source.stat().st_ino
        assert not [p for p in r.folder.iterdir() if p.name.startswith(".")]  # no temporaries left
        assert export_lmstudio(pair, models).llm.how == "already there"  # same bytes: left alone
    finally:
        shutil.rmtree(models, ignore_errors=True)


def test_place_file_refuses_a_different_file(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    with pytest.raises(LlavaGgufError, match="already exists"):
        place_file(a, b, force=False)
    assert place_file(a, b, force=True).how == "linked" and b.stat().st_ino == a.stat().st_ino


def test_mmproj_prefix_and_default_models_dir(tmp_path):
    assert layout_names(Path("x/llava-Q4_K_M.gguf"), Path("x/vision-F16.gguf"), "llava") == \
        ("llava-Q4_K_M.gguf", "mmproj-vision-F16.gguf")
    assert layout_names(Path("mmproj-odd.gguf"), Path("mmproj-x.gguf"), "m") == ("m-mmproj-odd.gguf", "mmproj-x.gguf")
    home = tmp_path / "home"
    home.mkdir()
    assert default_models_dir(home) == home / ".lmstudio" / "models"  # LM Studio 0.3+
    (home / ".cache" / "lm-studio").mkdir(parents=True)
    assert default_models_dir(home) == home / ".cache" / "lm-studio" / "models"  # an older install
    (tmp_path / "elsewhere").mkdir()
    (home / ".lmstudio-home-pointer").write_text(f"{tmp_path / 'elsewhere'}\n")
    assert default_models_dir(home) == tmp_path / "elsewhere" / "models"


def test_lmstudio_cli_uses_lm_studios_folder(pairs, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    p = run_cli("export", "lmstudio", str(pairs["vicuna"]), env={"HOME": str(home)})
    assert p.returncode == 0, p.stderr
    folder = home / ".lmstudio" / "models" / "llava-gguf" / "tiny-default"
    assert str(folder) in p.stdout and "linked" in p.stdout
    assert sorted(x.name for x in folder.iterdir()) == ["mmproj-tiny-default-F16.gguf", "tiny-default-F16.gguf"]
