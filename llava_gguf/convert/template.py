"""Chat templates that llama.cpp's own tools can use without `--jinja`.

llama-mtmd-cli, llama-cli and llama-server without --jinja do not run a GGUF's Jinja template:
`llama_chat_apply_template` picks one of llama.cpp's built-in layouts from marker strings in the template
text (`llm_chat_detect_template`, src/llama-chat.cpp) and aborts ("this custom template is not supported,
try using --jinja") when none matches. llava-hf's Vicuna template writes its roles as
`message['role'].upper() + ': '`, so it never contains "USER: ", and every LLaVA-1.5 file written with it
aborted there. (The family's own template is written to be recognised: see families/llava15.py.)

A checkpoint's own template is kept byte for byte: when it renders exactly what the family's template
renders (sample conversations, rendered with jinja2 as transformers does) but llama.cpp would not
recognise it, a Jinja comment naming the built-in layout and carrying its markers is appended. A comment
renders nothing for every input — unlike an "equivalent" rewrite, which could only be proven equal on the
conversations we tried — and it says what it is for. The result is rendered again and kept only if it
still renders identically and llama.cpp would now pick the intended layout. Note that a built-in layout
is llama.cpp's approximation (other whitespace around the image and the roles); --jinja is exact."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llava_gguf.errors import warn
from llava_gguf.gguf.chat_template import compile_template

# llama.cpp's template names (LLM_CHAT_TEMPLATES): a template that is exactly one of these is that layout
_NAMED = frozenset((
    "chatml llama2 llama2-sys llama2-sys-bos llama2-sys-strip mistral-v1 mistral-v3 mistral-v3-tekken mistral-v7 "
    "mistral-v7-tekken phi3 phi4 falcon3 zephyr monarch gemma orion openchat vicuna vicuna-orca deepseek deepseek2 "
    "deepseek3 deepseek-ocr command-r llama3 chatglm3 chatglm4 glmedge minicpm exaone3 exaone4 exaone-moe "
    "rwkv-world granite granite-4.0 granite-4.1 gigachat megrez yandex bailing bailing-think bailing2 llama4 "
    "smolvlm hunyuan-moe gpt-oss hunyuan-dense hunyuan-vl kimi-k2 seed_oss grok-2 pangu-embedded solar-open").split())


def llama_cpp_layout(template: str) -> str | None:
    """The built-in layout llama.cpp (the vendored src/llama-chat.cpp, llm_chat_detect_template) picks
    for `template`, by its name; None where it knows none, i.e. where its tools abort without --jinja.
    A literal port of the C++ if-chain, in its order: the first match wins."""
    def has(*needles: str) -> bool:
        return all(n in template for n in needles)

    if template in _NAMED:
        return template
    if has("<|im_start|>"):
        return "phi4" if has("<|im_sep|>") else "smolvlm" if has("<end_of_utterance>") else "chatml"
    if template.startswith("mistral") or has("[INST]"):
        if has("[SYSTEM_PROMPT]"):
            return "mistral-v7"
        if has("' [INST] ' + system_message") or has("[AVAILABLE_TOOLS]"):
            return "mistral-v1" if has(" [INST]") else "mistral-v3-tekken" if has('"[INST]"') else "mistral-v3"
        if has("content.strip()"):
            return "llama2-sys-strip"
        if has("bos_token + '[INST]"):
            return "llama2-sys-bos"
        return "llama2-sys" if has("<<SYS>>") else "llama2"
    for name, test in _RULES:
        if test(has):
            return name
    return None


_Has = Callable[..., bool]
_RULES: tuple[tuple[str, Callable[[_Has], bool]], ...] = (
    ("phi3", lambda h: h("<|assistant|>", "<|end|>")),
    ("chatglm4", lambda h: h("[gMASK]<sop>")),
    ("exaone-moe", lambda h: h("<|assistant|>", "<|user|>", "<|tool_declare|>")),
    ("falcon3", lambda h: h("<|assistant|>", "<|user|>", "</s>")),
    ("glmedge", lambda h: h("<|assistant|>", "<|user|>") or h("<|{{ item['role'] }}|>", "<|begin_of_image|>")),
    ("zephyr", lambda h: h("<|user|>", "<|endoftext|>")),
    ("monarch", lambda h: h("bos_token + message['role']")),
    ("gemma", lambda h: h("<start_of_turn>")),
    ("orion", lambda h: h("'\\n\\nAssistant: ' + eos_token")),
    ("openchat", lambda h: h("GPT4 Correct ")),
    ("vicuna-orca", lambda h: h("USER: ", "ASSISTANT: ", "SYSTEM: ")),
    ("vicuna", lambda h: h("USER: ", "ASSISTANT: ")),
    ("deepseek", lambda h: h("### Instruction:", "<|EOT|>")),
    ("command-r", lambda h: h("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>")),
    ("llama3", lambda h: h("<|start_header_id|>", "<|end_header_id|>")),
    ("chatglm3", lambda h: h("[gMASK]sop")),
    ("minicpm", lambda h: h("<用户>")),
    ("deepseek2", lambda h: h("'Assistant: ' + message['content'] + eos_token")),
    ("deepseek3", lambda h: h("<｜Assistant｜>", "<｜User｜>", "<｜end▁of▁sentence｜>")),
    ("exaone4", lambda h: h("[|system|]", "[|assistant|]", "[|endofturn|]", "[|tool|]")),
    ("exaone3", lambda h: h("[|system|]", "[|assistant|]", "[|endofturn|]")),
    ("rwkv-world", lambda h: h("rwkv-world") or h("{{- 'User: ' + message['content']|trim + '\\n\\n' -}}")),
    ("granite-4.0", lambda h: h("<|start_of_role|>", "g4_default_system_message")
     and (h("<tool_call>") or h("<tools>"))),
    ("granite-4.1", lambda h: h("<|start_of_role|>") and (h("<tool_call>") or h("<tools>"))),
    ("granite", lambda h: h("<|start_of_role|>")),
    ("gigachat", lambda h: h("message['role'] + additional_special_tokens[0] + message['content'] + "
                             "additional_special_tokens[1]")),
    ("megrez", lambda h: h("<|role_start|>")),
    ("yandex", lambda h: h(" Ассистент:")),
    ("bailing", lambda h: h("<role>ASSISTANT</role>", "'HUMAN'")),
    ("bailing-think", lambda h: h("<role>ASSISTANT</role>", '"HUMAN"', "<think>")),
    ("bailing2", lambda h: h("<role>ASSISTANT</role>", "<role>HUMAN</role>", "<|role_end|>")),
    ("llama4", lambda h: h("<|header_start|>", "<|header_end|>")),
    ("dots1", lambda h: h("<|endofuserprompt|>")),
    ("hunyuan-moe", lambda h: h("<|extra_0|>", "<|extra_4|>")),
    ("gpt-oss", lambda h: h("<|start|>", "<|channel|>")),
    ("hunyuan-vl", lambda h: h("<｜hy_Assistant｜>", "<｜hy_begin▁of▁sentence｜>")),
    ("hunyuan-dense", lambda h: h("<｜hy_Assistant｜>", "<｜hy_place▁holder▁no▁3｜>")),
    ("kimi-k2", lambda h: h("<|im_assistant|>assistant<|im_middle|>")),
    ("seed_oss", lambda h: h("<seed:bos>")),
    ("grok-2", lambda h: h("'Assistant: '  + message['content'] + '<|separator|>")),
    ("pangu-embedded", lambda h: h("[unused9]系统：[unused10]")),
    ("solar-open", lambda h: h("<|begin|>", "<|end|>", "<|content|>")),
)

# What a comment must contain for llm_chat_detect_template to pick each layout a LLaVA checkpoint uses
# (and nothing that an earlier branch of the chain looks for).
LAYOUT_MARKERS: dict[str, tuple[str, ...]] = {
    "vicuna": ("USER: ", "ASSISTANT: "),
    "chatml": ("<|im_start|>",),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>"),
    "llama2": ("[INST]",),
}


def layout_comment(layout: str) -> str:
    markers = " ".join(json.dumps(m, ensure_ascii=False) for m in LAYOUT_MARKERS[layout])
    return (f"{{# llama.cpp without --jinja: built-in layout {layout} ({markers}); llava-gguf checked that this "
            "template renders what the family's template renders; --jinja renders it exactly #}")


# ------------------------------------------------------------------ rendering as transformers does
@dataclass(frozen=True)
class Probe:
    """A sample conversation: (role, number of images, text) per message."""
    messages: tuple[tuple[str, int, str], ...]
    add_generation_prompt: bool = True


# The conversations the comparison renders: one image and a question, several images, a follow-up
# after an answer, a system prompt, text only, and a finished turn without the generation prompt.
PROBES = (
    Probe((("user", 1, "What is in the image?"),)),
    Probe((("user", 2, "Compare them."),)),
    Probe((("user", 1, "Describe it."), ("assistant", 0, "A red circle."), ("user", 0, "And the colour?"))),
    Probe((("system", 0, "Answer briefly."), ("user", 1, "What shape?"))),
    Probe((("user", 0, "Hello there"),)),
    Probe((("user", 1, "Q"), ("assistant", 0, "A")), add_generation_prompt=False),
)
BOS, EOS = "<s>", "</s>"


class TemplateRaised(Exception):
    """The template called raise_exception (or failed): a rendering outcome like any other."""


def _raise(message: str) -> None:
    raise TemplateRaised(message)


def render_probe(template: str, probe: Probe, texts: Callable[[str], str] = lambda t: t) -> str:
    """`probe` rendered in Hugging Face's multimodal message form (llava-hf's templates iterate over
    the content parts); a template error or raise_exception gives the message, marked, as the result."""
    messages = [{"role": role, "content": [{"type": "image"}] * n + [{"type": "text", "text": texts(text)}]}
                for role, n, text in probe.messages]
    try:
        return compile_template(template).render(
            messages=messages, add_generation_prompt=probe.add_generation_prompt, bos_token=BOS, eos_token=EOS,
            raise_exception=_raise, strftime_now=lambda fmt: "26 Jul 2024")  # a fixed date: renderings compare
    except Exception as e:  # noqa: BLE001 - whatever a checkpoint's template does is an outcome to compare
        return f"\0error: {type(e).__name__}: {e}"


def renders_same(a: str, b: str, probes: Sequence[Probe] = PROBES) -> bool:
    """Whether templates `a` and `b` render every probe to the same text (and neither fails on one)."""
    for p in probes:
        ra, rb = render_probe(a, p), render_probe(b, p)
        if ra != rb or ra.startswith("\0error"):
            return False
    return True


def template_text(template: str) -> str:
    """What the template itself writes around the messages: every probe that renders, with the
    messages' texts left empty."""
    rendered = (render_probe(template, p, lambda _t: "") for p in PROBES)
    return "".join(r for r in rendered if not r.startswith("\0error"))


# ------------------------------------------------------------------ the conversion step
@dataclass(frozen=True)
class Prepared:
    template: str  # what to write into the GGUF
    layout: str | None  # llama.cpp's built-in layout for it, None: its tools need --jinja
    annotated: bool  # a layout comment was appended


def for_llama_cpp(template: str, reference: str | None) -> Prepared:
    """`template` as it should go into the GGUF: unchanged when llama.cpp already recognises it (ChatML,
    LLaMA-3, Mistral's [INST], a family template written to be recognised); with a layout comment when
    it renders exactly what `reference` (the family's template, which llama.cpp recognises) renders."""
    layout = llama_cpp_layout(template)
    if layout is not None or reference is None:
        return Prepared(template, layout, False)
    want = llama_cpp_layout(reference)
    if want not in LAYOUT_MARKERS or not renders_same(template, reference):
        return Prepared(template, None, False)
    comment = layout_comment(want)
    # At the end a comment touches no text (trim_blocks would eat a newline after it, lstrip_blocks the
    # indentation before it); the start is the fallback. Either is kept only if proven harmless.
    for candidate in (template + comment, comment + template):
        if llama_cpp_layout(candidate) == want and renders_same(candidate, template):
            return Prepared(candidate, want, True)
    return Prepared(template, None, False)


def default_template(chat_template: str | list | None) -> str | None:
    """The template a chat uses: the text, or the one named "default" in tokenizer_config.json's list form."""
    if isinstance(chat_template, list):  # named templates (tokenizer_config.json's list form)
        return next((t.get("template") for t in chat_template if isinstance(t, dict) and t.get("name") == "default"),
                    None)
    return chat_template


def templates_for_llama_cpp(chat_template: str | list | None, family_template: str | None) -> str | list | None:
    """The template(s) to write, each made recognisable to llama.cpp's tools where it renders the family's
    layout (see above); a default template they cannot use without --jinja gets a warning."""
    if chat_template is None:
        return None
    if isinstance(chat_template, list):
        prepared = [{**t, "template": for_llama_cpp(t["template"], family_template).template}
                    if isinstance(t, dict) and isinstance(t.get("template"), str) else t for t in chat_template]
    else:
        prepared = for_llama_cpp(chat_template, family_template).template
    default = default_template(prepared)
    if default is not None and llama_cpp_layout(default) is None:
        warn("llama.cpp's own tools (llama-mtmd-cli, llama-server) do not recognise the checkpoint's chat template "
             "and will stop with 'this custom template is not supported' unless run with --jinja",
             "llava-gguf's own chat renders the template itself")
    return prepared
