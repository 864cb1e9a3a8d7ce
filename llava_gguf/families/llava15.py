"""LLaVA-1.5 as Hugging Face transformers saves it (`LlavaForConditionalGeneration`, llava-hf/*):
CLIP ViT vision tower -> 2-layer GELU MLP projector -> LLaMA-architecture language model."""
from __future__ import annotations

from collections.abc import Callable

from llava_gguf.families.family import Family, KeyLayout

# The three key layouts transformers has written for LlavaForConditionalGeneration.
LAYOUTS = (
    KeyLayout(  # transformers < 4.52 (most hub checkpoints, llava-hf/llava-1.5-*-hf)
        name="transformers<4.52",
        text=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
        vision="vision_tower.vision_model.",
        projector="multi_modal_projector.",
    ),
    KeyLayout(  # transformers 4.52 - 4.57
        name="transformers-4.52",
        text=(("model.language_model.", "model."), ("lm_head.", "lm_head.")),
        vision="model.vision_tower.vision_model.",
        projector="model.multi_modal_projector.",
    ),
    KeyLayout(  # transformers 5.x
        name="transformers-5",
        text=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
        vision="vision_tower.",
        projector="multi_modal_projector.",
    ),
)

VISION_GLOBALS = (
    ("embeddings.class_embedding", "v.class_embd"),
    ("embeddings.patch_embedding.weight", "v.patch_embd.weight"),
    ("embeddings.position_embedding.weight", "v.position_embd.weight"),
    ("pre_layrnorm.weight", "v.pre_ln.weight"),
    ("pre_layrnorm.bias", "v.pre_ln.bias"),
)

VISION_BLOCKS = (
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.out_proj", "attn_out"),
    ("layer_norm1", "ln1"),
    ("layer_norm2", "ln2"),
    ("mlp.fc1", "ffn_up"),
    ("mlp.fc2", "ffn_down"),
)

# LLaVA takes features from an inner layer, before CLIP's post-layernorm.
VISION_DROPPED = ("post_layernorm.", "embeddings.position_ids")

# gguf-py's generic map would say mm.1/mm.2; libmtmd's mlp projector loads mm.0 and mm.2.
PROJECTOR = (
    ("linear_1.weight", "mm.0.weight"),
    ("linear_1.bias", "mm.0.bias"),
    ("linear_2.weight", "mm.2.weight"),
    ("linear_2.bias", "mm.2.bias"),
)

# llava-hf's own template for LLaVA-1.5 (Vicuna v1.1 roles, images before the text), as the hub's
# chat_template.json carries it (llava-hf/llava-1.5-7b-hf, bakLlava-v1-hf, this project's shipped model).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The family's template, used when a checkpoint carries none: the same text as LLAVA_HF_TEMPLATE for every
# conversation, written so that llama.cpp's tools recognise it without --jinja. Their built-in layout is
# picked from marker strings in the template (llm_chat_detect_template: "USER: " and "ASSISTANT: " for
# Vicuna), and llava-hf's `message['role'].upper() + ': '` contains neither, so llama-mtmd-cli aborted on
# every file written with it. Here the two roles are spelt out; any other role still gets its name in
# capitals, as upper() gives. transformers' `{% generation %}` tag (a training-time mask marker that renders
# its body) is left out: plain Jinja engines (jinja2 without transformers' extension, minijinja) refuse it.
VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% elif message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The prompt VICUNA_TEMPLATE renders for one user turn of one image and a question, with the generation
# prompt — the one layout that training, the demo's reference answers, verify and the tests build by hand
# (as token ids, to feed transformers). llama.cpp tokenizes the text before and after the image marker as
# two segments, so the ids are built the same way. `encode` tokenizes without special tokens.
Encode = Callable[[str], list[int]]


def vicuna_prompt_text(question: str, image: str = "<image>") -> str:
    """`USER: <image>\n{question} ASSISTANT:`, `image` standing for the image."""
    return f"USER: {image}\n{question} ASSISTANT:"


def vicuna_prompt_segments(encode: Encode, bos: int | None, question: str) -> tuple[list[int], list[int]]:
    """(ids before the image rows: BOS when the tokenizer has one and `USER: `, ids after them)."""
    return ([bos] if bos is not None else []) + encode("USER: "), encode(f"\n{question} ASSISTANT:")


def vicuna_prompt_ids(encode: Encode, bos: int | None, question: str, image_id: int, n_image: int) -> list[int]:
    """The whole prompt, the image token repeated once per image row (as LLaVA's processor does)."""
    before, after = vicuna_prompt_segments(encode, bos, question)
    return before + [image_id] * n_image + after


FAMILY = Family(
    name="llava-1.5",
    layouts=LAYOUTS,
    vision_globals=VISION_GLOBALS,
    vision_blocks=VISION_BLOCKS,
    vision_dropped=VISION_DROPPED,
    projector=PROJECTOR,
    projector_type="mlp",
    default_chat_template=VICUNA_TEMPLATE,
    transformers_class="LlavaForConditionalGeneration",
)
