"""Streaming GGUF writer: gguf-py writes the header, key-values and tensor infos; tensor data is
then streamed one tensor at a time. Tensors that need no change are copied file-to-file with
`os.copy_file_range` (the kernel moves the bytes; nothing is mapped into this process), everything
else is read, transformed and written, then dropped. gguf-py's own writer wants every tensor (or a
lazy graph of it) registered up front and writes through numpy, which is what we avoid here."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .checkpoint import TensorRef

QType = gguf.GGMLQuantizationType
_COPY_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its GGUF name and type, where it comes from, and what to do to it."""

    name: str
    shape: tuple[int, ...]  # numpy (row-major) order, as in the checkpoint
    qtype: QType
    source: TensorRef
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype), dtype=np.int64))

    @property
    def is_raw_copy(self) -> bool:
        return (self.transform is None and self.source.is_raw_range
                and _SOURCE_QTYPE.get(self.source.dtype) == self.qtype)

    def data(self) -> np.ndarray:
        arr = self.source.read()
        if self.transform is not None:
            arr = self.transform(arr)
        if self.qtype == QType.F32:
            return np.ascontiguousarray(arr, dtype=np.float32)
        if self.qtype == QType.F16 and arr.dtype == np.float16:
            return np.ascontiguousarray(arr)
        return gguf.quants.quantize(np.ascontiguousarray(arr), self.qtype)


_SOURCE_QTYPE = {"F32": QType.F32, "F16": QType.F16, "BF16": QType.BF16}


def can_quantize(shape: tuple[int, ...], qtype: QType) -> bool:
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return shape[-1] % block == 0


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int, on_bytes: Callable[[int], None]) -> None:
    use_cfr = hasattr(os, "copy_file_range")
    while count > 0:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, _COPY_CHUNK), offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise
                use_cfr = False
                continue
        else:
            buf = os.pread(src_fd, min(count, _COPY_CHUNK), offset)
            n = len(buf)
            if n:
                os.write(dst_fd, buf)  # regular files: a full write or an exception
        if n <= 0:
            raise EOFError("source file ended early")
        offset += n
        count -= n
        on_bytes(n)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


class StreamingGGUF:
    """Collects key-values (through the gguf-py writer it exposes as `.kv`) and planned tensors,
    then writes everything to one path in a single pass over the tensors."""

    def __init__(self, arch: str) -> None:
        self.kv = gguf.GGUFWriter(path=None, arch=arch)
        self.tensors: list[PlannedTensor] = []

    def add(self, t: PlannedTensor) -> None:
        self.tensors.append(t)
        self.kv.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def write_header(self, path: Path) -> int:
        """Write header, KV and tensor infos; return the file offset where tensor data starts."""
        self.kv.write_header_to_file(path=path)
        self.kv.write_kv_data_to_file()
        self.kv.write_ti_data_to_file()
        assert self.kv.fout is not None
        fout = self.kv.fout[0]
        pos = fout.tell()
        self.kv.write_padding(fout, pos)
        start = fout.tell()
        self.kv.close()
        return start


class TensorStream:
    """Writes the planned tensors of several StreamingGGUF files, interleaved in source order."""

    def __init__(self, outputs: list[tuple[StreamingGGUF, Path]]) -> None:
        self.outputs = outputs

    def run(self, on_bytes: Callable[[int], None], on_tensor: Callable[[str], None]) -> None:
        fds: list[int] = []
        src_fds: dict[Path, int] = {}
        try:
            jobs = []
            for gg, path in self.outputs:
                start = gg.write_header(path)
                fd = os.open(path, os.O_WRONLY)
                fds.append(fd)
                pos = start
                for t in gg.tensors:
                    jobs.append((t, fd, pos))
                    pos += gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)
            # Source order (file, offset): sequential reads, whichever output a tensor goes to.
            jobs.sort(key=lambda j: (str(j[0].source.file), j[0].source.offset))
            for t, fd, pos in jobs:
                os.lseek(fd, pos, os.SEEK_SET)
                if t.is_raw_copy:
                    src = src_fds.get(t.source.file)
                    if src is None:
                        src = src_fds[t.source.file] = os.open(t.source.file, os.O_RDONLY)
                    _copy_range(src, fd, t.source.offset, t.nbytes, on_bytes)
                else:
                    data = t.data()
                    if data.nbytes != t.nbytes:
                        raise AssertionError(f"{t.name}: planned {t.nbytes} bytes, produced {data.nbytes}")
                    _write_all(fd, memoryview(data).cast("B"))
                    on_bytes(t.nbytes)
                    del data
                pad = gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) - t.nbytes
                if pad:
                    _write_all(fd, memoryview(bytes(pad)))
                on_tensor(t.name)
        finally:
            for fd in fds:
                os.close(fd)
            for fd in src_fds.values():
                os.close(fd)
