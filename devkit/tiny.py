"""Tiny random LLaVA-1.5 checkpoints, built with transformers in the real key layouts.

For tests, benchmarks and the demo (no model hub is needed). The files look like a hub download of
llava-hf/llava-1.5-7b-hf: config.json, weights (single file or sharded with an index), the tokenizer files
(written by tokenizer_files.py), preprocessor_config.json, chat_template.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from devkit.tokenizer_files import corpus, write_llama3_tokenizer, write_tokenizer
from llava_gguf.checks.samples import sample_image  # noqa: F401 - the tests' test image, from here too
from llava_gguf.families.llava15 import LAYOUTS

LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)


@dataclass(frozen=True)
class TinySpec:
    layout: str = "transformers-5"
    dtype: str = "float32"  # float32 | float16 | bfloat16
    shards: int = 1
    weights_format: str = "safetensors"  # or "bin" (torch.save pickles, as older checkpoints ship)
    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 256  # a multiple of 256, so every llama.cpp quantization type applies
    text_ff: int = 512
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2  # grouped-query attention
    sp_vocab: int = 1000
    vocab_size: int = 1024  # padded like llava-hf's 32064: [PADn] rows after <image> and <pad>
    feature_layer: int = -2
    select_strategy: str = "default"
    hidden_act: str = "quick_gelu"
    seed: int = 0
    text_model: str = "llama"  # or "mistral" (BakLLaVA)
    tokenizer: str = "sentencepiece"  # "chatml": + <|im_start|>/<|im_end|> and Yi-34B's ChatML template;
    # "llama3": a byte-level BPE with LLaMA-3's pre-tokenizer, special tokens and template
    anyres: bool = False  # LLaVA-1.6 (LlavaNextForConditionalGeneration), pinpoints = multiples of image_size
    logit_scale: float = 8.0  # sharpen the random LM so greedy decoding is not a coin toss


def _write_tokenizer(out: Path, spec: TinySpec) -> None:
    if spec.tokenizer == "llama3":
        write_llama3_tokenizer(out, corpus(spec.seed), n_vocab=spec.sp_vocab, image_size=spec.image_size)
        return
    n = write_tokenizer(out, corpus(spec.seed), sp_vocab=spec.sp_vocab, image_size=spec.image_size,
                        chatml=spec.tokenizer == "chatml")
    assert n == spec.sp_vocab


def build_model(spec: TinySpec):
    """The random LlavaForConditionalGeneration (fp32) that `make_tiny_llava` saves."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(spec.seed)
    vc = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
                          num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                          image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.text_hidden,
                          hidden_act=spec.hidden_act)
    from transformers import MistralConfig

    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig}[spec.text_model]
    tc = text_cls(hidden_size=spec.text_hidden, intermediate_size=spec.text_ff, num_hidden_layers=spec.text_layers,
                     num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                     vocab_size=spec.vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     bos_token_id=1, eos_token_id=2, pad_token_id=spec.sp_vocab + 1)
    common = dict(vision_config=vc, text_config=tc, image_token_id=spec.sp_vocab,
                  vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=spec.select_strategy,
                  projector_hidden_act="gelu", image_seq_length=(spec.image_size // spec.patch_size) ** 2)
    if spec.anyres:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            **common, image_grid_pinpoints=pinpoints(spec.image_size))).eval()
        with torch.no_grad():  # transformers initialises it to ~0.02 noise around 0: make it matter
            model.model.image_newline.normal_(0, 1)
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(spec.logit_scale)
    return model


def pinpoints(size: int) -> list[list[int]]:
    """LLaVA-1.6's five grids (1x2, 2x1, 2x2, 3x1, 1x3 tiles) at the tower's resolution."""
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]


def _rename(name: str, layout: str) -> str:
    """transformers 5 state-dict names (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`,
    `model.multi_modal_projector.*`) -> the names `layout` stores on disk."""
    target = next(layout_ for layout_ in LAYOUTS if layout_.name == layout)
    if name.startswith("lm_head."):
        prefix = next(p for p, canon in target.text if canon == "lm_head.")
        return prefix + name[len("lm_head."):]
    if name.startswith("model.language_model."):
        prefix = next(p for p, canon in target.text if canon == "model.")
        return prefix + name[len("model.language_model."):]
    if name.startswith("model.vision_tower."):
        rest = name[len("model.vision_tower."):]
        rest = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
        return target.vision + rest
    if name.startswith("model.multi_modal_projector."):
        return target.projector + name[len("model.multi_modal_projector."):]
    if name == "model.image_newline":
        return "model.image_newline" if layout == "transformers-4.52" else "image_newline"
    raise ValueError(f"unexpected state-dict name {name}")


def save_checkpoint(model, out: Path, spec: TinySpec) -> None:
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    state = {_rename(k, spec.layout): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = cfg["dtype"] = spec.dtype
    cfg["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _save_state(state, out, spec)


def make_tiny_llava(out: Path | str, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny random LLaVA-1.5 checkpoint to `out` (created) and return it."""
    if spec.layout not in LAYOUT_NAMES:
        raise ValueError(f"layout must be one of {LAYOUT_NAMES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, spec)
    if spec.anyres:
        pre = json.loads((out / "preprocessor_config.json").read_text())
        pre.update({"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": pinpoints(spec.image_size),
                    "do_pad": True})
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    save_checkpoint(build_model(spec), out, spec)
    (out / "tiny-spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def make_tiny_liuhaotian(llava_dir: Path | str, out: Path | str, clip_out: Path | str | None, *,
                         clip_kind: str = "vision", weights_format: str = "bin", shards: int = 1,
                         with_tower: bool = False, tower_name: str = "openai/clip-vit-tiny-test",
                         linear_projector: bool = False) -> Path:
    """The llava-hf checkpoint `llava_dir` saved again the way the original LLaVA code saves it
    (`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`: a language-model config with mm_* fields,
    `model.*`, `lm_head.*`, `model.mm_projector.{0,2}.*`, no vision tower unless `with_tower`), plus the
    tower as a separate CLIP checkpoint in `clip_out`: a CLIPVisionModel (`clip_kind="vision"`) or a
    full CLIPModel with a text tower (`"full"`), as openai/clip-vit-large-patch14-336 ships. The same
    weights as `llava_dir`, so transformers' LlavaForConditionalGeneration on `llava_dir` is the reference.
    `linear_projector`: LLaVA v1's single `nn.Linear` (`model.mm_projector.{weight,bias}`, random, seeded; no
    mm_projector_type in the config, as v1 wrote it) instead of the checkpoint's MLP."""
    import shutil

    import torch
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel,
                              LlavaForConditionalGeneration)

    llava_dir, out = Path(llava_dir), Path(out)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    cfg = model.config
    text_type = cfg.text_config.model_type
    state: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            state["model." + k[len("model.language_model."):]] = v
        elif k.startswith("lm_head."):
            state[k] = v
        elif k.startswith("model.multi_modal_projector."):
            rest = k[len("model.multi_modal_projector."):].replace("linear_1.", "0.").replace("linear_2.", "2.")
            state["model.mm_projector." + rest] = v
        elif k.startswith("model.vision_tower.") and with_tower:
            rest = k[len("model.vision_tower."):]
            rest = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
            state["model.vision_tower.vision_tower.vision_model." + rest] = v
    if linear_projector:
        gen = torch.Generator().manual_seed(7)
        n_in, n_out = cfg.vision_config.hidden_size, cfg.text_config.hidden_size
        state = {k: v for k, v in state.items() if not k.startswith("model.mm_projector.")}
        state["model.mm_projector.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
        state["model.mm_projector.bias"] = torch.randn(n_out, generator=gen) * 0.1
    text = cfg.text_config.to_dict()
    for k in ("architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        text.pop(k, None)
    text.update({
        "architectures": ["LlavaMistralForCausalLM" if text_type == "mistral" else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if text_type == "mistral" else "llava_llama",
        "torch_dtype": "float16",
        "mm_vision_tower": tower_name, "mm_hidden_size": cfg.vision_config.hidden_size,
        "mm_vision_select_layer": cfg.vision_feature_layer, "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    })
    if linear_projector:
        del text["mm_projector_type"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(text, indent=2))
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llava_dir / f).is_file():
            shutil.copy2(llava_dir / f, out / f)
    spec = TinySpec(weights_format=weights_format, shards=shards, dtype="float16")
    _save_state({k: v.to(torch.float16).contiguous() for k, v in state.items()}, out, spec)
    if clip_out is not None:
        clip_out = Path(clip_out)
        if clip_kind == "vision":
            clip = CLIPVisionModel(cfg.vision_config)
        elif clip_kind == "full":
            tc = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=99, max_position_embeddings=16, projection_dim=cfg.vision_config.projection_dim,
                                bos_token_id=1, eos_token_id=2, pad_token_id=1)
            clip = CLIPModel(CLIPConfig(text_config=tc.to_dict(), vision_config=cfg.vision_config.to_dict(),
                                        projection_dim=cfg.vision_config.projection_dim))
        else:
            raise ValueError(clip_kind)
        # transformers 5's CLIPVisionModel is the vision transformer itself (no `vision_model` level)
        tower = model.model.vision_tower
        getattr(clip, "vision_model", clip).load_state_dict(getattr(tower, "vision_model", tower).state_dict())
        clip.save_pretrained(clip_out)
        shutil.copy2(llava_dir / "preprocessor_config.json", clip_out / "preprocessor_config.json")
    return out


def _save_state(state: dict, out: Path, spec: TinySpec) -> None:
    """`state` (final on-disk names) in `spec`'s weights format and shard count."""
    import torch
    from safetensors.torch import save_file

    binary = spec.weights_format == "bin"
    names = sorted(state)

    def save(tensors: dict, path: Path) -> None:
        if binary:
            torch.save(tensors, str(path))
        else:
            save_file(tensors, str(path), metadata={"format": "pt"})

    if spec.shards <= 1:
        save(state, out / ("pytorch_model.bin" if binary else "model.safetensors"))
        return
    per = -(-len(names) // spec.shards)
    weight_map = {}
    stem, ext = ("pytorch_model", "bin") if binary else ("model", "safetensors")
    for i in range(spec.shards):
        part = names[i * per:(i + 1) * per]
        fname = f"{stem}-{i + 1:05d}-of-{spec.shards:05d}.{ext}"
        save({n: state[n] for n in part}, out / fname)
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / f"{stem}.{ext}.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
