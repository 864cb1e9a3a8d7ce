"""Reading a Hugging Face checkpoint directory lazily: config, and tensors one at a time.

Safetensors headers are parsed directly (8-byte length + JSON), so every tensor is known by file,
byte range, dtype and shape before any weight is read. That lets the writer copy untouched tensors
with `os.copy_file_range` (kernel-side, no page ever mapped into this process) and read the rest
with plain `pread`, which keeps peak RSS independent of the model size. `.bin` pickles are opened
only with `torch.load(weights_only=True, mmap=True)`.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_gguf.errors import LlavaGgufError
from llava_gguf.families.hparams import spelt

# safetensors dtype -> (numpy storage dtype, bytes per element)
_ST_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # stored as uint16, widened to f32 on read
    "F64": (np.dtype("<f8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}


# safetensors' own cap (safetensors/src/tensor.rs, MAX_HEADER_SIZE): a longer header is refused there too,
# and reading one would cost its length in memory before any check
MAX_HEADER_SIZE = 100_000_000


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the checkpoint, not yet read."""

    name: str
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file` (-1: not a raw range, use `loader`)
    nbytes: int
    loader: Callable[[], np.ndarray] | None = None

    @property
    def is_raw_range(self) -> bool:
        return self.offset >= 0

    def read(self) -> np.ndarray:
        """The tensor as numpy, floats widened so that F32/F16 keep their dtype and BF16 becomes F32."""
        if self.loader is not None:
            return self.loader()
        storage, _ = _ST_DTYPES[self.dtype]
        buf = bytearray(self.nbytes)
        with open(self.file, "rb", buffering=0) as f:
            view = memoryview(buf)
            done = 0
            while done < self.nbytes:
                n = os.preadv(f.fileno(), [view[done:]], self.offset + done)
                if n <= 0:
                    raise LlavaGgufError(f"{self.file.name} is truncated (tensor {self.name})",
                                         "download the checkpoint again")
                done += n
        try:
            arr = np.frombuffer(buf, dtype=storage).reshape(self.shape)
        except ValueError:  # shapes the format allows and numpy does not: > 64 dimensions, [0, 2**62]
            raise LlavaGgufError(f"tensor {spelt(self.name)} in {self.file.name} has the shape "
                                 f"{spelt(list(self.shape))}, which no array can have",
                                 "the checkpoint is corrupt") from None
        if self.dtype == "BF16":
            arr = bf16_to_f32(arr)
        return arr


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict
    tensors: dict[str, TensorRef]  # in on-disk order (file, offset)
    weight_files: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def load_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LlavaGgufError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})",
                             f"the {what} is corrupt; download it again") from None
    except UnicodeDecodeError:
        raise LlavaGgufError(f"{path} is not UTF-8 text", f"the {what} is corrupt; download it again") from None
    except RecursionError:
        raise LlavaGgufError(f"{path} is not valid JSON (nested too deeply)",
                             f"the {what} is corrupt; download it again") from None
    if not isinstance(data, dict):
        raise LlavaGgufError(f"{path} does not hold a JSON object", f"the {what} is corrupt")
    return data


def read_config(src: Path) -> dict:
    if not src.exists():
        raise LlavaGgufError(f"{src} does not exist", "give the path of a downloaded Hugging Face checkpoint")
    if not src.is_dir():
        raise LlavaGgufError(f"{src} is not a directory", "give the checkpoint directory, not a file in it")
    cfg = src / "config.json"
    if not cfg.is_file():
        if not any(src.iterdir()):
            raise LlavaGgufError(f"{src} is empty", "give the path of a downloaded Hugging Face checkpoint")
        raise LlavaGgufError(f"{src} has no config.json", "is this a Hugging Face checkpoint directory?")
    return load_json(cfg, "config.json")


_U64_LIMIT = 2**64  # shapes and offsets are usize in safetensors (64-bit); a value past it is refused there


def _is_size(value: object) -> bool:
    """A JSON number serde_json reads as usize: an integer (not a bool, not 2.0), 0 <= value < 2**64."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64_LIMIT


def _no_constants(name: str) -> None:
    # NaN and Infinity: Python's json takes them, JSON (and serde_json, which safetensors parses with) does not
    raise ValueError(f"{name} is not JSON")


def _tensor_entry(name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked as safetensors checks a TensorInfo when it
    deserializes it (a known dtype, `shape` a list of usize, `data_offsets` two usize) and in
    Metadata::validate (begin <= end, the byte count dtype * prod(shape) without overflow)."""
    what = f"tensor {spelt(name)}"
    if not isinstance(info, dict):
        raise ValueError(f"{what} is described by {spelt(info)}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise ValueError(f"{what} has no {key}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise ValueError(f"{what} has the unsupported dtype {spelt(dtype)}")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise ValueError(f"{what} has the shape {spelt(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(x) for x in offsets)):
        raise ValueError(f"{what} has the data_offsets {spelt(offsets)}, not two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise ValueError(f"{what} ends (data_offsets {offsets}) before it begins")
    nbytes = _ST_DTYPES[dtype][1]
    for d in shape:  # safetensors' checked_mul: a product past 2**64 is an overflow, not a size
        nbytes *= d
        if nbytes >= _U64_LIMIT:
            raise ValueError(f"{what} has the shape {spelt(shape)}, whose byte count overflows")
    if end - begin != nbytes:
        raise ValueError(f"{what} spans {end - begin} bytes (data_offsets {offsets}) but its dtype {dtype} and "
                         f"shape {spelt(shape)} take {nbytes}")
    return dtype, tuple(shape), begin, end


def _check_metadata(metadata: object) -> None:
    # safetensors reads __metadata__ as Option<HashMap<String, String>>: absent, null, or strings only
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"__metadata__ {spelt(metadata)} is not an object of strings")


def _parse_safetensors_header(path: Path) -> list[TensorRef]:
    """The tensors of one safetensors file, with every header field checked as the safetensors library
    checks it (safetensors/src/tensor.rs: read_metadata, Metadata::validate) before anything trusts it:
    the header length, UTF-8 JSON, each entry's fields, and data ranges that tile the data section from
    its first byte to the end of the file with no gap and no overlap."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_SIZE:
                raise ValueError(f"header of {n} bytes, more than the format's {MAX_HEADER_SIZE}")
            if n > size - 8:
                raise ValueError("header length out of range")
            # UTF-8 only (json.loads would guess UTF-16/32 from bytes), and no NaN/Infinity
            header = json.loads(f.read(n).decode("utf-8"), parse_constant=_no_constants)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        _check_metadata(header.get("__metadata__"))
        data_start = 8 + n
        entries = sorted(((name, *_tensor_entry(name, info)) for name, info in header.items()
                          if name != "__metadata__"), key=lambda e: (e[3], e[4]))
        position = 0  # where the next tensor must begin: ranges are contiguous and start at 0
        refs = []
        for name, dtype, shape, begin, end in entries:
            if begin != position:
                raise ValueError(f"tensor {spelt(name)} begins at byte {begin} of the data, not {position} "
                                 "(tensors overlap or leave a gap)")
            position = end
            refs.append(TensorRef(name, dtype, shape, path, data_start + begin, end - begin))
        if data_start + position > size:
            last = entries[-1][0]
            raise LlavaGgufError(f"{path} is truncated ({size} bytes, tensor {spelt(last)} ends at "
                                 f"{data_start + position})", "download the checkpoint again")
        if data_start + position < size:
            raise ValueError(f"{size - data_start - position} bytes after the last tensor's data")
    except LlavaGgufError:
        raise
    except RecursionError:  # JSON nested deeper than Python's stack; serde_json (safetensors) stops at 128
        raise LlavaGgufError(f"{path} is not a valid safetensors file (its header is nested too deeply)",
                             "download the checkpoint again") from None
    except (ValueError, struct.error, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise LlavaGgufError(f"{path} is not a valid safetensors file ({str(e)[:200]})",
                             "download the checkpoint again") from None
    except OSError as e:
        raise LlavaGgufError(f"cannot read {path}: {e.strerror}") from None
    return refs


def _torch_bin_refs(path: Path) -> list[TensorRef]:
    import torch  # heavy (seconds to import): only pytorch_model*.bin checkpoints need it

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower() or "weights_only" in str(e):
            raise LlavaGgufError(f"{path} holds more than tensors: torch.load(weights_only=True) refuses to unpickle "
                                 "the other objects in it, since unpickling them could run code",
                                 "re-save its state_dict (tensors only) or as safetensors where you trust the file") from None
        raise LlavaGgufError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})",
                             "download the checkpoint again") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise LlavaGgufError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})",
                             "download the checkpoint again") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    refs = []
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        dtype = names.get(t.dtype)
        if dtype is None:
            continue

        def load(t: torch.Tensor = t) -> np.ndarray:
            if t.dtype == torch.bfloat16:
                return t.float().numpy()
            return t.contiguous().numpy().copy()

        refs.append(TensorRef(name, dtype, tuple(t.shape), path, -1, t.numel() * t.element_size(), load))
    return refs


def _shard_name(name: object, index_name: str) -> str:
    """A shard named by an index must be a plain relative path inside the checkpoint: a `..` component
    or an absolute path would read a file elsewhere (an index is input, like any other file of a
    download). Symlinks inside the checkpoint stay fine: the Hugging Face cache's snapshots are
    symlinks to blobs."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise LlavaGgufError(f"{index_name} names a shard that is not a file name ({str(name)[:80]!r})",
                             "the index is corrupt; download it again")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (len(parts[0]) >= 2 and parts[0][1] == ":"):
        raise LlavaGgufError(f"{index_name} names the shard {name!r}, which is outside the checkpoint directory",
                             "a shard must be a relative path inside it; the index is corrupt or crafted")
    return name


def _weight_files(src: Path) -> tuple[list[Path], str]:
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = src / index_name
        if index.is_file():
            data = load_json(index, index_name)
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LlavaGgufError(f"{index} has no weight_map", "the index is corrupt; download it again")
            files = sorted({_shard_name(f, index_name) for f in weight_map.values()})
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise LlavaGgufError(f"shard {missing[0]} named in {index_name} is missing from {src}"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                                     "the download is incomplete")
            return [src / f for f in files], kind
    st = sorted(src.glob("*.safetensors"))
    if st:
        return st, "safetensors"
    bins = sorted(p for p in src.glob("pytorch_model*.bin"))
    if bins:
        return bins, "bin"
    raise LlavaGgufError(f"{src} has no weights (*.safetensors or pytorch_model*.bin)", "the download is incomplete")


def read_checkpoint(src: Path) -> Checkpoint:
    """Parse config and tensor headers; no weight is read here."""
    src = Path(src)
    config = read_config(src)
    files, kind = _weight_files(src)
    refs: list[TensorRef] = []
    for f in files:
        refs.extend(_parse_safetensors_header(f) if kind == "safetensors" else _torch_bin_refs(f))
    tensors: dict[str, TensorRef] = {}
    for r in sorted(refs, key=lambda r: (str(r.file), r.offset)):
        if r.name in tensors:
            raise LlavaGgufError(f"tensor {r.name} appears in more than one weight file", "the checkpoint is inconsistent")
        tensors[r.name] = r
    return Checkpoint(src, config, tensors, tuple(files))
