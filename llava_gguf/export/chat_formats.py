"""The chat formats an export can hand to another runtime: for each, the Jinja template our runtime renders
(what a GGUF's own template must render the same as), the same prompt as an Ollama TEMPLATE (Go's
text/template), and the strings that end a turn. `detect_format` names the format a model's prompt is in by
rendering sample conversations with our runtime's renderer, never by matching the template's text.

How Ollama lays out an image (server/prompt.go `chatPrompt`, runner/llamarunner `inputs`): each image of a
message becomes the tag `[img-N]` (N counts the request's images from 0) put before the message's text, with
nothing between; the runner splits the prompt on those tags and decodes the image's embeddings there. It
tokenizes the first piece with the model's BOS (`Tokenize(part, i == 0, true)`), as our runtime lets llama.cpp
add it, so no template writes BOS. Our prompt has `<image>\n` per image before the text; the TEMPLATE rebuilds
the same: it counts the images of the messages it has seen (Go templates have no arithmetic: a string grows by
one character per image and `len` reads the count), checks that the message's text starts with exactly the
tags Ollama put there, and writes each tag followed by a newline, then the text after them. A text that does
not start with them (a user who wrote `[img]`, which Ollama substitutes in place) is written as it is: the
image then stays where the user put it. /api/generate tags its images differently (see _MESSAGE_TEXT); past
GENERATE_IMAGES images there a blank line stays between the last image and the prompt.

A conversation that ends with an assistant message is continued by Ollama (a prefill): the last assistant
turn is left open."""
from __future__ import annotations

from dataclasses import dataclass

from llava_gguf.convert.template import PROBES as TEMPLATE_PROBES
from llava_gguf.errors import LlavaGgufError
from llava_gguf.families.llava15 import VICUNA_TEMPLATE
from llava_gguf.runtime.prompt import Message, render_conversation

# What libmtmd's default marker is; only stripped from message texts while rendering, which the sample
# conversations below never contain
MTMD_MARKER = "<__media__>"

# The message's text with Ollama's image tags turned into ours (`$text`); `$n` counts the images so far. A chat
# message carries its images (.Images) and their tags before its text. /api/generate (server/routes.go) sends
# each image as a user message of its tag alone, which `collate` merges with the prompt: "[img-0]\n\n<prompt>",
# no .Images; those tags are taken up to GENERATE_IMAGES times (a template has no loops but `range`).
GENERATE_IMAGES = 4
_GENERATE_TAG = (
    '{{- $g = printf "[img-%d]\\n\\n" (len $n) }}\n'
    '{{- if and (le (len $g) (len $text)) (eq (slice $text 0 (len $g)) $g) }}'
    '{{ $tags = printf "%s[img-%d]\\n" $tags (len $n) }}{{ $text = slice $text (len $g) }}{{ $n = printf "%s." $n }}'
    '{{ end }}\n')
_MESSAGE_TEXT = (
    '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
    '{{- $p := "" }}\n'
    '{{- $tags := "" }}\n'
    '{{- range .Images }}\n'
    '{{- $p = printf "%s[img-%d]" $p (len $n) }}\n'
    '{{- $tags = printf "%s[img-%d]\\n" $tags (len $n) }}\n'
    '{{- $n = printf "%s." $n }}\n'
    '{{- end }}\n'
    '{{- $text := .Content }}\n'
    '{{- if and $p (le (len $p) (len .Content)) (eq (slice .Content 0 (len $p)) $p) }}\n'
    '{{- $text = slice .Content (len $p) }}\n'
    '{{- else if not $p }}\n'
    '{{- $g := "" }}\n'
    + _GENERATE_TAG * GENERATE_IMAGES +
    '{{- else }}\n'
    '{{- $tags = "" }}\n'
    '{{- end }}\n'
    '{{- $text = printf "%s%s" $tags $text }}\n'
)


def _go_template(body: str) -> str:
    """A TEMPLATE: every message in turn, `body` writing one (with `$text` and `$last` set). Literal text is
    written only inside actions (`{{ "USER: " }}`), so the `{{-` trimming can never eat a space of the prompt."""
    return '{{- $n := "" }}\n{{- range $i, $m := .Messages }}\n' + _MESSAGE_TEXT + body + '{{- end }}'


@dataclass(frozen=True)
class ChatFormat:
    name: str  # as the export prints it
    jinja: str  # the template our runtime renders for this format (llava-hf's, or the family default)
    go_template: str  # Ollama's TEMPLATE, rendering the same text
    stops: tuple[str, ...]  # Ollama `PARAMETER stop`: a turn's start (the end-of-generation token stops anyway)


VICUNA = ChatFormat(
    "Vicuna (LLaVA-1.5)", VICUNA_TEMPLATE,
    _go_template(
        '{{- if eq .Role "user" }}{{ "USER: " }}{{ $text }}{{ " " }}\n'
        '{{- else if eq .Role "assistant" }}{{ "ASSISTANT: " }}{{ $text }}{{ if not $last }}{{ " " }}{{ end }}\n'
        '{{- else if eq .Role "system" }}{{ $text }}{{ " " }}\n'
        '{{- else if eq .Role "tool" }}{{ "TOOL: " }}{{ $text }}{{ " " }}\n'
        '{{- end }}\n'
        '{{- if and $last (ne .Role "assistant") }}{{ "ASSISTANT:" }}{{ end }}\n'),
    ("USER:", "ASSISTANT:"))

# llava-hf/llava-v1.6-mistral-7b-hf's template (Mistral's [INST], a system prompt in <<SYS>>)
MISTRAL_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] "
    "+ '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

MISTRAL = ChatFormat(
    "Mistral (LLaVA-1.6-Mistral)", MISTRAL_JINJA,
    _go_template(
        '{{- if eq .Role "system" }}{{ "<<SYS>>\\n" }}{{ $text }}{{ "\\n<</SYS>>\\n\\n" }}\n'
        '{{- else if eq .Role "user" }}{{ "[INST] " }}{{ $text }}{{ " [/INST]" }}\n'
        '{{- else if eq .Role "assistant" }}{{ " " }}{{ $text }}{{ if not $last }}{{ "</s> " }}{{ end }}\n'
        '{{- end }}\n'),
    ("[INST]", "[/INST]"))

# llava-hf/llava-v1.6-34b-hf's template (Nous-Hermes-2-Yi-34B: ChatML)
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CHATML = ChatFormat(
    "ChatML (LLaVA-1.6-34B, Yi, Qwen)", CHATML_JINJA,
    _go_template(
        '{{- "<|im_start|>" }}{{ .Role }}{{ "\\n" }}{{ $text }}\n'
        '{{- if not (and $last (eq .Role "assistant")) }}{{ "<|im_end|>\\n" }}{{ end }}\n'
        '{{- if and $last (ne .Role "assistant") }}{{ "<|im_start|>assistant\\n" }}{{ end }}\n'),
    ("<|im_start|>", "<|im_end|>"))

# llava-hf/llama3-llava-next-8b-hf's template
LLAMA3_JINJA = (
    "{% for message in messages %}{{'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA3 = ChatFormat(
    "LLaMA-3 (llava-llama-3)", LLAMA3_JINJA,
    _go_template(
        '{{- "<|start_header_id|>" }}{{ .Role }}{{ "<|end_header_id|>\\n\\n" }}{{ $text }}\n'
        '{{- if not (and $last (eq .Role "assistant")) }}{{ "<|eot_id|>" }}{{ end }}\n'
        '{{- if and $last (ne .Role "assistant") }}{{ "<|start_header_id|>assistant<|end_header_id|>\\n\\n" }}'
        '{{ end }}\n'),
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

FORMATS: tuple[ChatFormat, ...] = (VICUNA, MISTRAL, CHATML, LLAMA3)

# The conversations a model's template must render as a format's does: convert's template comparisons
# (convert/template.py), those Ollama can send (always with the generation prompt) — an image and a
# question, two images, a follow-up after an answer, a system prompt, text only.
PROBES: tuple[tuple[Message, ...], ...] = tuple(
    tuple(Message(role, text, n_images) for role, n_images, text in probe.messages)
    for probe in TEMPLATE_PROBES if probe.add_generation_prompt)


def _renders(templates: list[str], messages: tuple[Message, ...], bos: str, eos: str) -> str | None:
    try:
        return render_conversation(templates, list(messages), bos=bos, eos=eos, marker=MTMD_MARKER)
    except LlavaGgufError:  # the template refused the conversation: not this format
        return None


def detect_format(templates: list[str], bos: str, eos: str) -> ChatFormat:
    """The format whose prompts our runtime's rendering of `templates` (the model's own template, then the
    family default, as the runtime tries them) equals on every probe; a one-line error when none does."""
    ours = [_renders(templates, p, bos, eos) for p in PROBES]
    for fmt in FORMATS:
        if None not in ours and ours == [_renders([fmt.jinja], p, bos, eos) for p in PROBES]:
            return fmt
    raise LlavaGgufError("the model's chat template renders none of the formats an export knows "
                         f"({', '.join(f.name for f in FORMATS)})",
                         "the Modelfile's TEMPLATE would prompt the model differently from `llava-gguf chat`")
