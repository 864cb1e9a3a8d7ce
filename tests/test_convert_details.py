"""Details of what convert writes, beyond parity."""
from __future__ import annotations

import json
import shutil

import gguf
import pytest

from llava_gguf.convert import convert_checkpoint
from llava_gguf.families.llava15 import VICUNA_TEMPLATE
from llava_gguf.errors import LlavaGgufError


def test_mmproj_metadata_follows_libmtmd(tiny, converted):
    ckpt = tiny(vision_layers=4)
    _, mmproj = converted(ckpt, "f16")
    r = gguf.GGUFReader(mmproj)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "clip" and f["clip.projector_type"] == "mlp"
    assert f["clip.has_vision_encoder"] is True
    # vision_feature_layer -2 of 4 layers -> hidden_states index 3; exactly 3 layers stored
    assert f["clip.vision.feature_layer"] == [3]
    assert r.fields["clip.vision.feature_layer"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert f["clip.vision.block_count"] == 3
    names = {t.name for t in r.tensors}
    assert "v.blk.2.attn_q.weight" in names and "v.blk.3.attn_q.weight" not in names
    assert not any(n.startswith("v.post_ln") for n in names)
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} <= names
    assert "clip.use_gelu" not in f and "clip.use_silu" not in f  # quick_gelu is clip.cpp's default
    assert f["clip.vision.projection_dim"] == 256


def test_family_template_when_the_checkpoint_has_none(tiny, tmp_path):
    ckpt = shutil.copytree(tiny(), tmp_path / "no-template")
    (ckpt / "chat_template.json").unlink()
    r = convert_checkpoint(ckpt, tmp_path / "out")
    fields = gguf.GGUFReader(r.llm).fields
    assert fields["tokenizer.chat_template"].contents() == VICUNA_TEMPLATE


def test_checkpoint_without_projector(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = shutil.copytree(tiny(), tmp_path / "no-projector")
    state = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in state.items() if "multi_modal_projector" not in k}, ckpt / "model.safetensors")
    with pytest.raises(LlavaGgufError, match="projector"):
        convert_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_name_and_types_in_file_names(tiny, tmp_path):
    r = convert_checkpoint(tiny(), tmp_path / "out", outtype="bf16", mmproj_type="q8_0", name="my-llava")
    assert r.llm.name == "my-llava-BF16.gguf" and r.mmproj.name == "mmproj-my-llava-Q8_0.gguf"
    assert gguf.GGUFReader(r.llm).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16


def test_no_partial_files_after_success(tiny, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(tiny(), out)
    assert sorted(p.suffix for p in out.iterdir()) == [".gguf", ".gguf"]


def test_tied_embeddings_need_no_output_tensor(tiny, tmp_path):
    """A checkpoint without lm_head (tied embeddings) converts; llama.cpp reuses token_embd."""
    from safetensors.numpy import load_file, save_file

    ckpt = shutil.copytree(tiny(), tmp_path / "tied")
    state = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in state.items() if "lm_head" not in k}, ckpt / "model.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = convert_checkpoint(ckpt, tmp_path / "out")
    names = {t.name for t in gguf.GGUFReader(r.llm).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    from llava_gguf import LLaVA
    from devkit.tiny import sample_image

    with LLaVA(r.llm, r.mmproj) as m:
        assert isinstance(m.generate_from_image(sample_image(112), "hi", temperature=0, max_tokens=3), str)
