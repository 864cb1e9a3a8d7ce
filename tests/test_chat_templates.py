"""Chat templates that llama.cpp's tools recognise without --jinja (convert/template.py), while every
Jinja rendering — ours, transformers', llama.cpp's --jinja — stays what the family's template renders.
No model is loaded: llama.cpp's own `llama_chat_apply_template` is the judge of what its tools accept."""
from __future__ import annotations

import ctypes

import pytest

from llava_gguf.families.llava15 import LLAVA_HF_TEMPLATE, VICUNA_TEMPLATE
from llava_gguf.convert.template import LAYOUT_MARKERS, PROBES, for_llama_cpp, llama_cpp_layout, render_probe
from llava_gguf.runtime.prompt import Message, render
from devkit.tokenizer_files import CHATML_TEMPLATE, LLAMA3_TEMPLATE

# llava-hf/llava-v1.6-mistral-7b-hf's template (Mistral's [INST] with <<SYS>>: llama.cpp's llama2-sys)
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] "
    "+ '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
ANNOTATED = for_llama_cpp(LLAVA_HF_TEMPLATE, VICUNA_TEMPLATE).template

# Conversations beyond the probes the converter uses: other roles, braces and Jinja-looking text,
# several images in several turns, empty text, no generation prompt.
CONVERSATIONS = [
    ([Message("user", "What is in the image?", 1)], True),
    ([Message("system", "Be brief."), Message("user", "Q1", 2), Message("assistant", "A1"),
      Message("user", "{{ 'x' }} {% if %} <image> USER: }}", 1)], True),
    ([Message("user", "", 1), Message("assistant", ""), Message("tool", "42"), Message("user", "ok")], False),
    ([Message("user", "line one\nline two\t", 3)], True),
    ([Message("assistant", "starts with an answer")], True),
]


def _llama_cpp_apply(template: str) -> str | None:
    """What llama.cpp's tools render without --jinja for a fixed chat (None: 'not supported')."""
    from llava_gguf.native import library as native

    lc = native.llama_cpp()
    chat = [("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")]
    msgs = (lc.llama_chat_message * len(chat))(*[lc.llama_chat_message(role=r.encode(), content=c.encode())
                                                 for r, c in chat])
    buf = ctypes.create_string_buffer(1 << 14)
    n = lc.llama_chat_apply_template(template.encode(), msgs, len(chat), True, buf, len(buf))
    return None if n < 0 else buf.raw[:n].decode()


def test_llava_hf_template_is_unknown_to_llama_cpp_and_ours_is_vicuna():
    # the defect: llava-hf's template (what checkpoints and, before, our family default carried) is rejected
    assert _llama_cpp_apply(LLAVA_HF_TEMPLATE) is None and llama_cpp_layout(LLAVA_HF_TEMPLATE) is None
    for template in (VICUNA_TEMPLATE, ANNOTATED):
        assert llama_cpp_layout(template) == "vicuna"
        assert _llama_cpp_apply(template) == "S\n\nUSER: U1\nASSISTANT: A1</s>\nUSER: U2\nASSISTANT:"


@pytest.mark.parametrize("template", [VICUNA_TEMPLATE, ANNOTATED], ids=["family-default", "checkpoint-annotated"])
def test_renders_exactly_what_llava_hf_renders(template):
    """Our runtime's renderer and transformers' own give byte-identical prompts to llava-hf's template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    for messages, gen in CONVERSATIONS:
        ours = [render(t, messages, bos="<s>", eos="</s>", add_generation_prompt=gen)
                for t in (template, LLAVA_HF_TEMPLATE)]
        assert ours[0] == ours[1]
        conv = [{"role": m.role, "content": [{"type": "image"}] * m.n_images + [{"type": "text", "text": m.text}]}
                for m in messages]
        hf = [render_jinja_template([conv], chat_template=t, add_generation_prompt=gen, bos_token="<s>",
                                    eos_token="</s>")[0][0] for t in (template, LLAVA_HF_TEMPLATE)]
        assert hf[0] == hf[1] == ours[0]


def test_checkpoint_template_is_kept_and_annotated():
    r = for_llama_cpp(LLAVA_HF_TEMPLATE, VICUNA_TEMPLATE)
    assert r.annotated and r.layout == "vicuna"
    assert r.template.startswith(LLAVA_HF_TEMPLATE) and r.template.endswith("#}")  # one comment appended
    comment = r.template[len(LLAVA_HF_TEMPLATE):]
    assert all(m in comment for m in LAYOUT_MARKERS["vicuna"]) and "SYSTEM: " not in comment


@pytest.mark.parametrize("template,layout", [(CHATML_TEMPLATE, "chatml"), (LLAMA3_TEMPLATE, "llama3"),
                                             (MISTRAL_TEMPLATE, "llama2-sys"), (VICUNA_TEMPLATE, "vicuna")])
def test_recognised_templates_are_unchanged(template, layout):
    r = for_llama_cpp(template, VICUNA_TEMPLATE)
    assert (r.template, r.layout, r.annotated) == (template, layout, False)
    assert _llama_cpp_apply(template) is not None


def test_other_layouts_are_not_annotated():
    """A template llama.cpp does not know and that renders something else than the family's layout is
    left alone (no false claim); so is one that fails to render."""
    human = ("{% for m in messages %}{{ 'Human: ' if m['role'] == 'user' else 'Bot: ' }}"
             "{{ m['content'][-1]['text'] }}\n{% endfor %}{% if add_generation_prompt %}Bot:{% endif %}")
    # the same as llava-hf except one space: not the family's layout
    near = LLAVA_HF_TEMPLATE.replace("{{ 'ASSISTANT:' }}", "{{ 'ASSISTANT: ' }}")
    for template in (human, near, "{% for %}", "{{ raise_exception('no') }}"):
        r = for_llama_cpp(template, VICUNA_TEMPLATE)
        assert (r.template, r.layout, r.annotated) == (template, None, False)


def test_comment_placement_keeps_whitespace():
    """trim_blocks/lstrip_blocks act around comments too: indentation that ends a template would be
    stripped before an appended comment, so there the comment goes first; the result renders as before."""
    ending = LLAVA_HF_TEMPLATE + "\n  "  # trim_blocks eats the newline, the two spaces are rendered
    reference = VICUNA_TEMPLATE + "{{ '  ' }}"
    assert llama_cpp_layout(ending) is None and llama_cpp_layout(reference) == "vicuna"
    r = for_llama_cpp(ending, reference)
    assert r.annotated and r.template.endswith(ending) and r.template != ending
    for probe in PROBES:
        assert render_probe(r.template, probe) == render_probe(ending, probe) == render_probe(reference, probe)


# One template per branch of llm_chat_detect_template (its marker strings), and some that match none.
DETECTION_CASES = [
    "chatml", "vicuna", "mistral at the start", "<|im_start|>", "<|im_start|><|im_sep|>",
    "<|im_start|><end_of_utterance>",
    "[INST]", "[INST][SYSTEM_PROMPT]", "' [INST] ' + system_message", "[INST][AVAILABLE_TOOLS]",
    "\"[INST]\"[AVAILABLE_TOOLS]", "[INST] content.strip()", "bos_token + '[INST]", "[INST]<<SYS>>",
    "<|assistant|><|end|>", "[gMASK]<sop>", "<|assistant|><|user|><|tool_declare|>", "<|assistant|><|user|></s>",
    "<|assistant|><|user|>", "<|{{ item['role'] }}|><|begin_of_image|>", "<|user|><|endoftext|>",
    "bos_token + message['role']", "<start_of_turn>", "'\\n\\nAssistant: ' + eos_token", "GPT4 Correct ",
    "USER: ASSISTANT: SYSTEM: ", "USER: ASSISTANT: ", "### Instruction:<|EOT|>",
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|start_header_id|><|end_header_id|>", "[gMASK]sop", "<用户>",
    "'Assistant: ' + message['content'] + eos_token", "<｜Assistant｜><｜User｜><｜end▁of▁sentence｜>",
    "[|system|][|assistant|][|endofturn|]", "[|system|][|assistant|][|endofturn|][|tool|]", "rwkv-world",
    "<|start_of_role|>", "<|start_of_role|><tools>", "<|start_of_role|><tool_call>g4_default_system_message",
    "<|role_start|>", " Ассистент:", "<role>ASSISTANT</role>'HUMAN'", "<role>ASSISTANT</role>\"HUMAN\"<think>",
    "<role>ASSISTANT</role><role>HUMAN</role><|role_end|>", "<|header_start|><|header_end|>",
    "<|endofuserprompt|>", "<|extra_0|><|extra_4|>", "<|start|><|channel|>", "<|im_assistant|>assistant<|im_middle|>",
    "<seed:bos>", "[unused9]系统：[unused10]", "<|begin|><|end|><|content|>",
    # none: llava-hf's roles, markers without their space, lower case, nothing
    LLAVA_HF_TEMPLATE, "USER:ASSISTANT:", "user: assistant: ", "USER: only", "no markers at all",
]


@pytest.mark.parametrize("template", [VICUNA_TEMPLATE, ANNOTATED, CHATML_TEMPLATE, LLAMA3_TEMPLATE,
                                      MISTRAL_TEMPLATE, *DETECTION_CASES])
def test_detection_port_matches_llama_cpp(template):
    """llama_cpp_layout ports llm_chat_detect_template: where it names a layout, llama.cpp renders a chat
    with that layout's name exactly as with the template; where it names none, llama.cpp refuses."""
    layout = llama_cpp_layout(template)
    real = _llama_cpp_apply(template)
    if layout is None:
        assert real is None
    else:  # dots1 is the one layout llama.cpp detects but has no name for
        assert real is not None and real == _llama_cpp_apply(layout) if layout != "dots1" else real, layout


def test_probe_renderer_agrees_with_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    for template in (LLAVA_HF_TEMPLATE, CHATML_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE):
        for probe in PROBES:
            conv = [{"role": r, "content": [{"type": "image"}] * n + [{"type": "text", "text": t}]}
                    for r, n, t in probe.messages]
            hf = render_jinja_template([conv], chat_template=template, bos_token="<s>", eos_token="</s>",
                                       add_generation_prompt=probe.add_generation_prompt)[0][0]
            assert render_probe(template, probe) == hf


def test_runtime_renders_converted_files_as_before(tiny, converted):
    """The runtime renders from the GGUF's template: for a converted checkpoint (llava-hf's template,
    annotated) every prompt is byte for byte what llava-hf's template gives."""
    from llava_gguf import LLaVA
    from llava_gguf.runtime.prompt import render_with_images

    llm, mmproj = converted(tiny(), "f16")
    with LLaVA(llm, mmproj, n_threads=2) as m:
        assert m.llm_info.chat_template == ANNOTATED
        for messages, gen in CONVERSATIONS:
            messages = [msg for msg in messages if "<image>" not in msg.text]  # render() escapes that text
            want = render_with_images([LLAVA_HF_TEMPLATE], messages, bos="<s>", eos="</s>", add_generation_prompt=gen)
            assert m.render(messages, add_generation_prompt=gen) == want


def test_named_templates_each_prepared():
    """tokenizer_config.json may hold a list of named templates: each is prepared on its own."""
    from llava_gguf.convert.template import templates_for_llama_cpp as _templates_for_llama_cpp

    named = [{"name": "default", "template": LLAVA_HF_TEMPLATE}, {"name": "tool_use", "template": CHATML_TEMPLATE}]
    assert _templates_for_llama_cpp(named, VICUNA_TEMPLATE) == [{"name": "default", "template": ANNOTATED},
                                                              {"name": "tool_use", "template": CHATML_TEMPLATE}]


def test_convert_warns_about_a_template_llama_cpp_tools_reject(tiny, tmp_path):
    import json
    import shutil

    import gguf

    from support import run_cli

    human = ("{% for m in messages %}{{ 'Human: ' if m['role'] == 'user' else 'Bot: ' }}{% for c in m['content'] %}"
             "{{ '<image>\n' if c['type'] == 'image' else c['text'] }}{% endfor %}\n{% endfor %}"
             "{% if add_generation_prompt %}Bot:{% endif %}")
    ckpt = shutil.copytree(tiny(), tmp_path / "custom-template")
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": human}))
    p = run_cli("convert", str(ckpt), "-o", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:") and "chat template" in ln]
    assert len(warnings) == 1 and "--jinja" in warnings[0], p.stderr
    llm = next((tmp_path / "out").glob("custom-template-*.gguf"))
    assert gguf.GGUFReader(llm).fields["tokenizer.chat_template"].contents() == human  # written as it is
