"""The Jinja environment every chat template is rendered in — converting (convert/template.py compares
templates) and running (runtime/prompt.py) alike — as transformers builds it
(utils/chat_template_utils.py `_compile_jinja_template`): sandboxed, trim_blocks and lstrip_blocks, loop
controls, its `{% generation %}` tag rendered as its body, and its `tojson` filter. The caller passes
`raise_exception` (and `strftime_now` where a template may ask for the date) when rendering.

One environment for both, so that what convert proves about a template (it renders the same as the family's)
is what the runtime then renders."""
from __future__ import annotations

import json
from functools import lru_cache

from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _tojson(x, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' own: json.dumps with ensure_ascii=False (Jinja's built-in tojson escapes HTML characters)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag (marks assistant text for training
    masks; llava-hf's template uses it): rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=32)
def compile_template(template: str):
    """The compiled template (cached: a conversation renders the same template at every turn). Raises
    jinja2's TemplateSyntaxError for text that is not a template."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def jinja_error_line(e: Exception) -> str:
    """jinja2's message without the location and source lines its TemplateSyntaxError appends."""
    message = getattr(e, "message", None) or str(e) or type(e).__name__
    line = getattr(e, "lineno", None)
    return " ".join(str(message).split())[:300] + (f" (template line {line})" if line else "")


def template_problem(template: str | bytes) -> str | None:
    """Why a GGUF's chat template cannot render a prompt (not UTF-8, not valid Jinja), or None."""
    if isinstance(template, bytes):
        try:
            template = template.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"it is not UTF-8 (byte {e.start})"
    try:
        compile_template(template)
    except Exception as e:  # noqa: BLE001 - jinja2's syntax errors, and a RecursionError on hostile nesting
        return f"it is not valid Jinja: {jinja_error_line(e)}"
    return None
