"""Prompt rendering from the GGUF's own chat template (the family default when it has none), with the
image before the text as LLaVA was trained; never a handler's hard-coded system prompt."""
from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.chat_template import compile_template, jinja_error_line
from llava_gguf.runtime.sampling import check_text

IMAGE_PLACEHOLDER = "<image>"
LITERAL_IMAGE = "\ue000image\ue001"  # "<image>" the user wrote, kept apart from image slots while rendering
ROLES = {"system": "the system prompt", "user": "the prompt", "assistant": "an assistant message"}


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    text: str
    n_images: int = 0
    # an assistant answer's token ids as the model generated them: fed back as they are (re-tokenizing the
    # text can split it differently, which would make the KV cache's copy look changed)
    tokens: tuple[int, ...] | None = None


def _content(m: Message) -> list[dict]:
    # Hugging Face's multimodal message form, which llava-hf's templates iterate over.
    return [{"type": "image"} for _ in range(m.n_images)] + [{"type": "text", "text": m.text}]


def _raise_exception(message: str) -> None:
    raise LlavaGgufError(f"the chat template refused the conversation: {message}")


def render(template: str, messages: list[Message], *, bos: str, eos: str, add_generation_prompt: bool = True) -> str:
    """The prompt text, with IMAGE_PLACEHOLDER where each image goes (in order)."""
    try:
        text = compile_template(template).render(
            messages=[{"role": m.role, "content": _content(m)} for m in messages],
            add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos,
            raise_exception=_raise_exception)
    except TemplateError as e:
        raise LlavaGgufError(f"the model's chat template failed: {jinja_error_line(e)}") from None
    return text


def render_with_images(templates: list[str], messages: list[Message], *, bos: str, eos: str,
                       add_generation_prompt: bool = True) -> str:
    """Render with the first template that places every image; the last is the family default."""
    n_images = sum(m.n_images for m in messages)
    for template in templates:
        text = render(template, messages, bos=bos, eos=eos, add_generation_prompt=add_generation_prompt)
        if text.count(IMAGE_PLACEHOLDER) == n_images:
            if bos and text.startswith(bos):
                text = text[len(bos):]  # llama.cpp adds BOS itself
            return text
    raise LlavaGgufError("no chat template places the images in the prompt")


def render_conversation(templates: list[str], messages: list[Message], *, bos: str, eos: str, marker: str,
                        add_generation_prompt: bool = True) -> str:
    """The conversation's prompt text: each message's text checked (valid UTF-8), and text that happens to
    contain "<image>" or libmtmd's `marker` kept as text (it becomes "< image>"), not an image slot."""
    for m in messages:
        check_text(m.text or "", ROLES.get(m.role, f"a {m.role} message"))
    messages = [Message(m.role, (m.text or "").replace(marker, "").replace(IMAGE_PLACEHOLDER, LITERAL_IMAGE),
                        m.n_images) for m in messages]
    text = render_with_images(templates, messages, bos=bos, eos=eos, add_generation_prompt=add_generation_prompt)
    return text.replace(LITERAL_IMAGE, IMAGE_PLACEHOLDER.replace("<", "< "))
