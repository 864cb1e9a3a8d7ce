"""The image side of the engine: a prompt and its images tokenized by libmtmd into segments, each image's
embedding rows (libmtmd's vision tower and projector, or LLaVA-1.6's anyres tiling of them), and the
embedding cache shared by every sequence (an image is encoded once per content hash while it stays in
the cache; least recently used images go first)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from llava_gguf.errors import LlavaGgufError
from llava_gguf.native.mtmd import Bitmap, Chunks, Vision
from llava_gguf.runtime.anyres import AnyresGeometry, pack, tiles
from llava_gguf.runtime.images import ImageInput, content_hash, load_image
from llava_gguf.runtime.prompt import IMAGE_PLACEHOLDER
from llava_gguf.runtime.sampling import check_text
from llava_gguf.runtime.segments import ImageSegment, Segment, TextSegment

IMAGE_CACHE_BYTES = 256 * 2**20  # embedding rows kept for images seen before (LRU)


class Unencodable(LlavaGgufError):
    """A character the model's vocabulary has no token for (and no byte-fallback tokens to spell it)."""

    def __init__(self, char: str, in_user_text: bool | None = None) -> None:
        name = {"\n": "newline", "\t": "tab", " ": "space", "\r": "carriage return"}.get(char)
        shown = f"the {name} (U+{ord(char):04X})" if name else f"{char!r} (U+{ord(char):04X})"
        where = {True: "your text", False: "the prompt (the chat template adds it)", None: "the prompt"}[in_user_text]
        hint = ("leave the character out" if in_user_text else
                "convert the model again with a tokenizer that has byte_fallback or a piece for it")
        super().__init__(f"the model's vocabulary cannot encode {shown} in {where}: its SentencePiece tokenizer has "
                         "no piece for it and no byte fallback (libmtmd code 2)", hint)
        self.char = char

    def located(self, in_user_text: bool) -> Unencodable:
        return Unencodable(self.char, in_user_text)


class EmbeddingCache:
    """Embedding rows by image content hash, least recently used dropped first past `limit_bytes` (the
    newest image always stays: it is about to be decoded)."""

    def __init__(self, limit_bytes: int = IMAGE_CACHE_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.rows: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, digest: str) -> np.ndarray | None:
        rows = self.rows.get(digest)
        if rows is not None:
            self.rows.move_to_end(digest)
        return rows

    def put(self, digest: str, rows: np.ndarray) -> None:
        self.rows[digest] = rows
        size = sum(v.nbytes for v in self.rows.values())
        while len(self.rows) > 1 and size > self.limit_bytes:
            _, old = self.rows.popitem(last=False)
            size -= old.nbytes

    def clear(self) -> None:
        self.rows.clear()


class ImageSide:
    """libmtmd's context for the mmproj, the anyres geometry when the mmproj has one, and the cache."""

    def __init__(self, vision: Vision, anyres: AnyresGeometry | None) -> None:
        self.vision = vision
        self.marker = vision.marker
        self.anyres = anyres
        self.cache = EmbeddingCache()
        self.encoded = 0  # images run through the vision tower so far

    # ------------------------------------------------------------------ tokenizing
    def tokenize(self, text: str, images: Sequence[ImageInput], add_special: bool) -> tuple[Chunks, list[Segment]]:
        """(mtmd chunks, segments) for `text`, whose IMAGE_PLACEHOLDERs are `images` in order. The
        segments' image chunks are valid until the caller closes the chunks."""
        loaded = []
        for im in images:
            img = load_image(im)
            data = img.tobytes()
            loaded.append((img, data, content_hash(img, data)))
        bitmaps = []
        try:
            for img, data, _ in loaded:
                if self.anyres is not None:
                    # the bitmap is only the image's place in the prompt (a tile-sized stand-in libmtmd turns
                    # into one chunk): its rows are computed from the image itself
                    side = self.anyres.size
                    bitmaps.append(Bitmap(side, side, bytes(side * side * 3)))
                else:
                    bitmaps.append(Bitmap(img.width, img.height, data))
        except MemoryError:
            for b in bitmaps:
                b.close()
            raise LlavaGgufError("libmtmd could not take the image") from None
        chunks = self._chunks(text, bitmaps, add_special)
        segments: list[Segment] = []
        k = 0
        for chunk in chunks:
            if chunk.is_text:
                segments.append(TextSegment(chunk.tokens))
                continue
            img, _, digest = loaded[k]
            k += 1
            if self.anyres is not None:
                cached = self.cache.rows.get(digest)
                n = len(cached) if cached is not None else self.anyres.rows((img.height, img.width))
                segments.append(ImageSegment(digest, n, chunk, img))
            else:
                segments.append(ImageSegment(digest, chunk.n_tokens, chunk))
        return chunks, segments

    def _chunks(self, text: str, bitmaps: list[Bitmap], add_special: bool) -> Chunks:
        """mtmd chunks for `text` with `bitmaps` (freed here) in its IMAGE_PLACEHOLDERs."""
        try:
            check_text(text, "the prompt")
        except LlavaGgufError:
            for b in bitmaps:
                b.close()
            raise
        chunks = self.vision.tokenize(text.replace(IMAGE_PLACEHOLDER, self.marker), bitmaps, add_special)
        if isinstance(chunks, int):
            raise self._tokenize_error(text, chunks, len(bitmaps))
        return chunks

    def _tokenizes(self, text: str) -> bool:
        """Whether the vocabulary can encode `text` (no images), through libmtmd, which catches llama.cpp's
        exception (llama_tokenize itself would let it escape into Python's process and abort it)."""
        chunks = self.vision.tokenize(text, [], False)
        if isinstance(chunks, int):
            return False
        chunks.close()
        return True

    def _tokenize_error(self, text: str, rc: int, n_images: int) -> LlavaGgufError:
        """Why mtmd_tokenize failed, in the user's terms. Its code 2 ("media preprocessing error" in mtmd.h)
        is also what it returns for any C++ exception while tokenizing (mtmd.cpp catches them all): a
        SentencePiece vocabulary with no byte fallback throws (llama_vocab::byte_to_token's map::at) on a
        character it has no piece for, such as the newline the chat template adds. The first such
        character is found by bisecting the text."""
        plain = text.replace(IMAGE_PLACEHOLDER, "")
        if rc == 2 and not self._tokenizes(plain):
            lo, hi = 0, len(plain)  # plain[:lo] tokenizes, plain[:hi] does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self._tokenizes(plain[:mid]) else (lo, mid)
            return Unencodable(plain[lo])
        if rc == 2 and n_images:
            return LlavaGgufError(f"libmtmd could not pre-process the image(s) (code {rc})",
                                  "run with --verbose for llama.cpp's log")
        return LlavaGgufError(f"libmtmd could not tokenize the prompt with {n_images} image(s) (code {rc})",
                              "run with --verbose for llama.cpp's log")

    # ------------------------------------------------------------------ rows
    def rows(self, seg: ImageSegment) -> tuple[np.ndarray, bool]:
        """(the embedding rows of an image segment, whether it was encoded now): from the cache, or encoded
        (and cached). The segment's chunk must still be valid."""
        cached = self.cache.get(seg.digest)
        if cached is not None:
            return cached, False
        rows = self._anyres_rows(seg.image) if self.anyres is not None else self._encode(seg.chunk)
        self.encoded += 1
        self.cache.put(seg.digest, rows)
        return rows, True

    def _encode(self, chunk) -> np.ndarray:
        try:
            return self.vision.encode(chunk)
        except RuntimeError:
            raise LlavaGgufError("libmtmd failed to encode the image") from None

    def _square_rows(self, img) -> np.ndarray:
        """libmtmd's rows for one image at the tower's resolution (an anyres tile: it neither resizes nor
        slices it)."""
        with self._chunks(IMAGE_PLACEHOLDER, [Bitmap(img.width, img.height, img.tobytes())], False) as chunks:
            for chunk in chunks:
                if not chunk.is_text:
                    return self._encode(chunk)
        raise LlavaGgufError("libmtmd produced no image chunk")

    def _anyres_rows(self, img) -> np.ndarray:
        a = self.anyres
        assert a is not None
        base, grid, shape = tiles(img, a.pins, a.size)
        rows = [self._square_rows(t) for t in [base] + grid]
        packed = pack(rows[0], rows[1:], shape, (img.height, img.width), a.newline)
        if len(packed) != a.rows((img.height, img.width)):  # pragma: no cover - count_rows mirrors pack
            raise LlavaGgufError("internal error: anyres row count mismatch")
        return packed

    def embed(self, image: ImageInput) -> np.ndarray:
        """The rows the LLM is fed for `image` (a copy)."""
        chunks, segments = self.tokenize(IMAGE_PLACEHOLDER, [image], add_special=False)
        with chunks:
            for seg in segments:
                if isinstance(seg, ImageSegment):
                    return self.rows(seg)[0].copy()
        raise LlavaGgufError("libmtmd produced no image chunk")

