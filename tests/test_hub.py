"""Checkpoints by Hugging Face Hub repo id (convert/hub.py), run as a user runs them (the CLI in a child
process) against a loopback Hub stand-in (devkit/hubstub.py) that speaks the endpoints huggingface_hub
calls: the download converts to the same bytes as a local directory NAME holding the same files; offline
from the cache; a cut download resumes; 401/403/404 and the other failures are one line each."""
from __future__ import annotations

import json
import shutil

import gguf
import pytest

from devkit.tiny import make_tiny_liuhaotian
from support import assert_clean_failure, hub_stub, one_error_line, run_cli

REPO = "llava-hf/tiny-llava"
NAME = "tiny-llava"
# what the repo holds besides the checkpoint: what convert must not fetch
JUNK = {"pytorch_model.bin": b"not a pickle: never downloaded", "flax_model.msgpack": b"flax",
        "tiny-spec.json": b"{}", "docs/notes.md": b"# notes"}
README = b"---\nlicense: apache-2.0\ntags:\n- llava\n---\n# tiny llava\n"
FETCHED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
           "preprocessor_config.json", "chat_template.json", "README.md"}


CHUNK = 10 * 1024 * 1024


def _json(p) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])


def _files(ckpt, **extra) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file() and p.name != "tiny-spec.json"}
    return {**files, "README.md": README, **JUNK, **extra}


@pytest.fixture(scope="module")
def hub(tiny):
    # weights past huggingface_hub's 10 MiB read chunk (constants.DOWNLOAD_CHUNK_SIZE): a cut download resumes
    # from the last whole chunk written, so a smaller file restarts from 0
    ckpt = tiny(text_layers=4)
    with hub_stub() as stub:
        stub.add_repo(REPO, _files(ckpt))
        stub.add_repo(REPO, {**_files(ckpt), "config.json": b"{not json"}, revision="broken")
        stub.add_repo("someone/private-llava", _files(ckpt), token="hf_secret")
        stub.add_repo("someone/gated-llava", _files(ckpt), token="hf_secret", gated=True)
        stub.add_repo("someone/no-weights", {"config.json": (ckpt / "config.json").read_bytes(), "README.md": README})
        yield stub


@pytest.fixture(scope="module")
def reference(hub, tmp_path_factory):
    """A local directory NAME holding exactly the files convert fetches, converted: what `convert ORG/NAME`
    must write byte for byte."""
    root = tmp_path_factory.mktemp("reference")
    local = root / NAME
    local.mkdir()
    commit = hub.repos[REPO].revisions["main"]
    for name in FETCHED:
        (local / name).write_bytes(hub.repos[REPO].commits[commit][name])
    out = root / "out"
    p = run_cli("convert", str(local), "-o", str(out), "--json")
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def cache(hub, tmp_path_factory):
    """A Hugging Face cache filled by one `convert ORG/NAME`, and that run's outputs."""
    root = tmp_path_factory.mktemp("hf")
    before = len(hub.requests)
    p = run_cli("convert", REPO, "-o", str(root / "out"), "--json", env=hub.env(root))
    assert p.returncode == 0, p.stderr
    return root, root / "out", hub.requests[before:], _json(p)


def _same_outputs(a, b) -> None:
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted([f"{NAME}-F16.gguf", f"mmproj-{NAME}-F16.gguf"])
    assert names == sorted(f.name for f in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_convert_by_repo_id_writes_what_the_local_copy_writes(hub, reference, cache):
    root, out, requests, result = cache
    _same_outputs(out, reference)
    assert result["llm"] == str(out / f"{NAME}-F16.gguf")
    # general.* from NAME and the model card, not from the snapshot folder (a commit hash)
    llm = gguf.GGUFReader(out / f"{NAME}-F16.gguf")
    assert llm.fields["general.license"].contents() == "apache-2.0"
    assert gguf.GGUFReader(out / f"mmproj-{NAME}-F16.gguf").fields["general.name"].contents() == NAME
    commit = hub.repos[REPO].revisions["main"]
    for f in out.iterdir():
        assert commit[:8].encode() not in f.read_bytes()
    # only what convert reads: safetensors, never the .bin beside them, nor flax weights, docs, spec
    got = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in requests if r.method == "GET" and "/resolve/" in r.path}
    assert got == FETCHED
    snapshot = root / "hub" / "models--llava-hf--tiny-llava" / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(FETCHED)


def test_offline_from_the_cache_and_without_it(hub, reference, cache, tmp_path):
    root, _, _, _ = cache
    before = len(hub.requests)
    out = tmp_path / "out"
    p = run_cli("convert", REPO, "-o", str(out), env={**hub.env(root), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    _same_outputs(out, reference)
    assert len(hub.requests) == before  # not one request
    info = _json(run_cli("inspect", REPO, "--json", env={**hub.env(root), "HF_HUB_OFFLINE": "1"}))
    assert info["convert_writes"]["llm"] == f"{NAME}-F16.gguf" and info["family"] == "llava-1.5"
    assert info["path"] == REPO  # not a temporary directory nor the snapshot's hash
    # verify takes the repo id too: transformers reads the same snapshot
    v = run_cli("verify", REPO, str(reference), "--tokens", "2", "--json", env={**hub.env(root), "HF_HUB_OFFLINE": "1"})
    assert v.returncode == 0, v.stderr
    assert _json(v)["passed"]
    # the Hub unreachable (nothing listens there): the cache answers too
    gone = run_cli("convert", REPO, "-o", str(tmp_path / "out2"),
                   env={**hub.env(root), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert gone.returncode == 0, gone.stderr
    _same_outputs(tmp_path / "out2", reference)

    empty = tmp_path / "empty"
    for env, words in [({"HF_HUB_OFFLINE": "1"}, ("not in the Hugging Face cache", "HF_HUB_OFFLINE")),
                       ({"HF_ENDPOINT": "http://127.0.0.1:9"}, ("cannot reach the Hugging Face Hub", "127.0.0.1:9"))]:
        bad = tmp_path / "bad"
        assert_clean_failure(run_cli("convert", REPO, "-o", str(bad), env={**hub.env(empty), **env}), bad,
                             REPO, *words)
    assert len(hub.requests) == before


def test_a_cut_download_resumes(hub, reference, tmp_path):
    size = len(hub.repos[REPO].commits[hub.repos[REPO].revisions["main"]]["model.safetensors"])
    at = CHUNK + 4321
    assert size > at + 100_000
    hub.cut("model.safetensors", at, times=1)
    before = len(hub.requests)
    p = run_cli("convert", REPO, "-o", str(tmp_path / "out"), env=hub.env(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr
    _same_outputs(tmp_path / "out", reference)
    gets = [r for r in hub.requests[before:] if r.method == "GET" and r.path.endswith("/model.safetensors")]
    # the second GET asks only for the rest, from the last chunk written
    assert [r.range for r in gets] == [None, f"bytes={CHUNK}-"]

    # cut for good: after huggingface_hub's retries (5, a second apart) one line; the next run completes
    hub.cut("model.safetensors", at, times=100)
    out = tmp_path / "out2"
    try:
        failed = run_cli("convert", REPO, "-o", str(out), env=hub.env(tmp_path / "hf2"))
    finally:
        hub.cut("model.safetensors", at, times=0)
    assert_clean_failure(failed, out, f"downloading {REPO} failed", "run again")
    p = run_cli("convert", REPO, "-o", str(out), env=hub.env(tmp_path / "hf2"))
    assert p.returncode == 0, p.stderr
    _same_outputs(out, reference)


def test_hub_failures_are_one_line(hub, tmp_path):
    out = tmp_path / "out"
    env = hub.env(tmp_path / "hf")
    for args, words in [
        (("llava-hf/no-such-model",), ("llava-hf/no-such-model", "neither a local path nor a repository")),
        ((REPO, "--revision", "v9"), (REPO, "no revision 'v9'")),
        (("someone/private-llava",), ("private or gated", "HF_TOKEN", "hf auth login")),
        (("someone/gated-llava",), ("gated repository", "HF_TOKEN", "hf auth login")),
        (("someone/no-weights",), ("has no weights",)),
        (("no/such/dir",), ("no/such/dir does not exist",)),
        ((REPO, "--revision", "broken"), ("config.json",)),  # the snapshot's own error, as for a directory
    ]:
        assert_clean_failure(run_cli("convert", *args, "-o", str(out), env=env), out, *words)
    before = len(hub.requests)  # options are checked before anything is downloaded
    assert_clean_failure(run_cli("convert", REPO, "--outtype", "q9_z", "-o", str(out), env=env), out, "--outtype")
    assert len(hub.requests) == before
    line = one_error_line(run_cli("inspect", "someone/private-llava", env=env), "private or gated")
    assert "Traceback" not in line
    # the token the library reads from HF_TOKEN opens the private repo
    p = run_cli("convert", "someone/private-llava", "-o", str(out), "--json", env={**env, "HF_TOKEN": "hf_secret"})
    assert p.returncode == 0, p.stderr
    assert _json(p)["llm"].endswith("private-llava-F16.gguf")
    assert any(r.authorization == "Bearer hf_secret" for r in hub.requests)


def test_a_local_directory_wins_over_the_repo_id(hub, tiny, monkeypatch, tmp_path):
    from llava_gguf.convert import convert_checkpoint

    other = tiny()  # not what the Hub serves under the same name
    local = tmp_path / "llava-hf" / NAME
    shutil.copytree(other, local)
    monkeypatch.chdir(tmp_path)
    before = len(hub.requests)
    r = convert_checkpoint(REPO, tmp_path / "out")
    assert len(hub.requests) == before
    ref = convert_checkpoint(local, tmp_path / "ref")
    assert r.llm.name == ref.llm.name == f"{NAME}-F16.gguf"
    assert r.llm.read_bytes() == ref.llm.read_bytes()
    with pytest.raises(Exception, match="--revision applies to a Hugging Face repo id"):
        convert_checkpoint(REPO, tmp_path / "out3", revision="main")


def test_original_layout_fetches_its_tower_by_name(hub, tiny, tmp_path):
    hf = tiny(dtype="float16")
    tower = "openai/clip-vit-tiny-hub"
    lh = make_tiny_liuhaotian(hf, tmp_path / "llava-v1.5-tiny", tmp_path / "clip", weights_format="safetensors",
                              tower_name=tower)
    clip_files = {p.name: p.read_bytes() for p in (tmp_path / "clip").iterdir()}
    assert "model.safetensors" in clip_files
    # as openai's CLIP repos ship: the same weights in several formats, a tokenizer the tower does not need
    hub.add_repo(tower, {**clip_files, "pytorch_model.bin": b"junk", "tf_model.h5": b"junk",
                         "flax_model.msgpack": b"junk", "vocab.json": b"{}"})
    with_clip = tmp_path / "with-clip"
    assert run_cli("convert", str(lh), "--clip", str(tmp_path / "clip"), "-o", str(with_clip)).returncode == 0
    before = len(hub.requests)
    out = tmp_path / "out"
    p = run_cli("convert", str(lh), "-o", str(out), "--json", env=hub.env(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr
    got = {r.path.rsplit("/", 1)[1] for r in hub.requests[before:] if r.method == "GET" and "/resolve/" in r.path}
    assert got == {"config.json", "preprocessor_config.json", "model.safetensors"}
    for f in with_clip.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    # offline afterwards: from the cache; a tower the Hub does not have: the existing one-line error
    p = run_cli("convert", str(lh), "-o", str(tmp_path / "out2"), env={**hub.env(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    (lh / "config.json").write_text(json.dumps({**json.loads((lh / "config.json").read_text()),
                                                "mm_vision_tower": "openai/not-on-the-hub"}))
    bad = tmp_path / "bad"
    assert_clean_failure(run_cli("convert", str(lh), "-o", str(bad), env=hub.env(tmp_path / "hf")), bad,
                         "openai/not-on-the-hub", "--clip")


def test_a_sharded_repo_fetches_the_shards_its_index_names(hub, tiny, tmp_path):
    ckpt = tiny(text_layers=4, shards=2)
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file() and p.name != "tiny-spec.json"}
    # a consolidated copy beside the shards (as Mistral-style repos carry): not in the index, not fetched
    hub.add_repo("llava-hf/tiny-sharded", {**files, "consolidated.safetensors": b"never fetched"})
    before = len(hub.requests)
    p = run_cli("convert", "llava-hf/tiny-sharded", "-o", str(tmp_path / "out"), env=hub.env(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr
    got = {r.path.rsplit("/", 1)[1] for r in hub.requests[before:] if r.method == "GET" and "/resolve/" in r.path}
    assert got == set(files)
    local = shutil.copytree(ckpt, tmp_path / "tiny-sharded", ignore=shutil.ignore_patterns("tiny-spec.json"))
    assert run_cli("convert", str(local), "-o", str(tmp_path / "ref")).returncode == 0
    for f in (tmp_path / "ref").iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name
