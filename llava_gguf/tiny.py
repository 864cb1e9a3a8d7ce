"""Tiny random LLaVA-1.5 checkpoints, built with transformers in the real key layouts.

For tests, benchmarks and the demo (no model hub is needed). The tokenizer is a SentencePiece model
trained in-process; the files look like a hub download of llava-hf/llava-1.5-7b-hf: config.json,
weights (single file or sharded with an index), tokenizer.model + tokenizer.json +
tokenizer_config.json (with added_tokens_decoder), preprocessor_config.json, chat_template.json."""
from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .convert.families.llava15 import LAYOUTS, LLAVA_HF_TEMPLATE

LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(4000)]
    words += ["USER", "ASSISTANT", "What", "is", "in", "the", "image", "A", "cat", "red", "circle", "Describe"]
    tails = [".", "?", "!", ",", " 123", " 4.5", " ünïcödé", " 日本語", " 😀", " \t", "\n", "  "]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 16))) + rng.choice(tails) for _ in range(3000)]


def _train_tokenizer(corpus: list[str], sp_vocab: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=sp_vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    return buf.getvalue()


def _write_preprocessor(out: Path, image_size: int) -> None:
    """llava-hf's CLIPImageProcessor config at the tower's resolution."""
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "do_convert_rgb": True, "resample": 3}, indent=2))


def _write_tokenizer(out: Path, spec: TinySpec) -> None:
    if spec.tokenizer == "llama3":
        write_llama3_tokenizer(out, _corpus(spec.seed), n_vocab=spec.sp_vocab, image_size=spec.image_size)
        return
    n = write_tokenizer(out, _corpus(spec.seed), sp_vocab=spec.sp_vocab, image_size=spec.image_size,
                        chatml=spec.tokenizer == "chatml")
    assert n == spec.sp_vocab


# LLaMA-3's pre-tokenizer split (tokenizer.json of meta-llama/Meta-Llama-3-8B and llama3-llava-next-8b)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# llava-hf/llama3-llava-next-8b-hf's template (images first, LLaMA-3 headers)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def write_llama3_tokenizer(out: Path, corpus: list[str], *, n_vocab: int, image_size: int) -> None:
    """A LLaMA-3-style tokenizer: byte-level BPE (no byte fallback) behind LLaMA-3's split regex, its
    header/eot special tokens, `<image>` at id `n_vocab` and `<pad>` after it, LLaMA-3's chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    base = n_vocab - len(LLAMA3_SPECIALS)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=base, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    k = 0
    while tok.get_vocab_size() < base:  # LLaMA-3 pads its vocabulary with reserved special tokens too
        tok.add_special_tokens([AddedToken(f"<|reserved_special_token_{k}|>", special=True, normalized=False)])
        k += 1
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    assert tok.token_to_id("<image>") == n_vocab and tok.token_to_id("<pad>") == n_vocab + 1
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "pad_token": "<pad>", "model_max_length": 8192, "clean_up_tokenization_spaces": False}, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE}))
    _write_preprocessor(out, image_size)


# llava-hf/llava-v1.6-34b-hf's template (Nous-Hermes-2-Yi-34B: ChatML)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tokenizer(out: Path, corpus: list[str], *, sp_vocab: int, image_size: int, chatml: bool = False) -> int:
    """A SentencePiece BPE tokenizer trained on `corpus` (at most `sp_vocab` pieces, byte fallback), with
    `<image>` and `<pad>` added after it, written as a hub LLaVA-1.5 checkpoint's tokenizer and processor
    files (with the Vicuna chat template); returns the number of SentencePiece pieces."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    model = _train_tokenizer(corpus, sp_vocab)
    n = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    (out / "tokenizer.model").write_bytes(model)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [n, n + 1]
    extra = ["<|im_start|>", "<|im_end|>"] if chatml else []  # ChatML (Yi-34B): <|im_end|> ends a turn
    if extra:
        tok.add_tokens(extra, special_tokens=True)
        tok.eos_token = "<|im_end|>"
    tok.save_pretrained(out)
    # transformers 5 no longer writes added_tokens_decoder; hub checkpoints (saved by 4.x) have it.
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in ((0, "<unk>"), (1, "<s>"), (2, "</s>"), (n, "<image>"), (n + 1, "<pad>"),
                     *((n + 2 + k, t) for k, t in enumerate(extra)))}
    cfg.update({"add_bos_token": True, "add_eos_token": False, "legacy": False, "padding_side": "left"})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    # Hub LLaMA tokenizers (llava-hf's included) were converted by transformers 4.x with the legacy
    # SentencePiece normalizer: "▁" prepended to every segment between special tokens, spaces kept.
    # transformers 5 writes a Metaspace pre-tokenizer instead, which folds a leading space into the
    # prefix; write what the hub files say.
    tj = json.loads((out / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                             {"type": "Replace", "pattern": {"String": " "},
                                                              "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    # llava-hf's template as the hub files carry it (convert makes it recognisable to llama.cpp's tools)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE if chatml else LLAVA_HF_TEMPLATE}))
    _write_preprocessor(out, image_size)
    return n


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


def sample_image(size: int, seed: int = 0):
    """A deterministic, structured RGB test image (gradients and shapes), size x size."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    arr = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1)
    arr += rng.normal(0, 12, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    s = size
    d.ellipse([s * 0.1, s * 0.1, s * 0.45, s * 0.45], fill=(220, 30, 40))
    d.rectangle([s * 0.55, s * 0.5, s * 0.9, s * 0.85], fill=(30, 60, 200))
    d.polygon([(s * 0.2, s * 0.9), (s * 0.4, s * 0.55), (s * 0.6, s * 0.9)], fill=(250, 220, 40))
    return img


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
