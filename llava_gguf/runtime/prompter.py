"""A conversation as an engine's prompt: rendered from the GGUF's chat template (the family default when it
has none), tokenized by libmtmd with its images, and the answers' own token ids spliced back in. Shared by
the LLaVA object (one sequence) and the server (every sequence of one engine)."""
from __future__ import annotations

from collections.abc import Sequence

from llava_gguf.native.mtmd import Chunks
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.images import ImageInput
from llava_gguf.runtime.prompt import Message, render_conversation
from llava_gguf.runtime.segments import Segment
from llava_gguf.runtime.splice import answers, splice_answers
from llava_gguf.runtime.vision import Unencodable


class Prompter:
    """Prompts for one engine's model (reads the model and libmtmd's tokenizer only: no decoding)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        files, llm = engine.files, engine.model
        self.templates = [t for t in (files.llm_info.chat_template, files.family_template) if t]
        # the BOS and EOS tokens' text, for the chat template (a turn renders it several times)
        self.bos, self.eos = (llm.piece(t).decode(errors="replace") if t >= 0 else "" for t in (llm.bos, llm.eos))

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return render_conversation(self.templates, messages, bos=self.bos, eos=self.eos,
                                   marker=self.engine.images.marker, add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: list[Message], images: Sequence[ImageInput]) -> tuple[Chunks, list[Segment]]:
        """(mtmd chunks, segments): the conversation rendered (with a generation prompt), tokenized, its
        answers' own ids spliced in. The caller closes the chunks."""
        text = self.render(messages)
        try:
            chunks, segments = self.engine.tokenize(text, list(images), add_special=True)
        except Unencodable as e:
            raise e.located(any(e.char in (m.text or "") for m in messages)) from None
        try:
            found = answers(messages, self.render, self.engine.images.marker)
            llm = self.engine.model
            return chunks, splice_answers(segments, found, llm.piece, llm.n_vocab)
        except BaseException:
            chunks.close()
            raise

    def count(self, messages: list[Message], images: Sequence[ImageInput]) -> int:
        """Positions the conversation would take in the context (text tokens + image rows), without decoding."""
        chunks, segments = self.prompt(messages, images)
        chunks.close()
        return sum(seg.n for seg in segments)
