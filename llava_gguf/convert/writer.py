"""Streaming GGUF writer: gguf-py writes the header, key-values and tensor infos; tensor data is
then streamed one tensor at a time, in source order, through a small page-aligned staging buffer
written with O_DIRECT where the file system allows it. Tensors that need no change are read
straight into that buffer; the rest are read, transformed, staged, and dropped. gguf-py's own writer
wants every tensor (or a lazy graph of it) registered up front and writes through numpy and the page
cache, which is what we avoid here."""
from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from llava_gguf.convert.checkpoint import TensorRef

QType = gguf.GGMLQuantizationType


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
    def padded_nbytes(self) -> int:
        """Bytes the tensor takes in the file, up to the next GGUF data alignment."""
        return gguf.GGUFWriter.ggml_pad(self.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)

    @property
    def is_raw_copy(self) -> bool:
        """Bytes on disk are already the output bytes: no transform, same type, a plain file range."""
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


class StreamingGGUF:
    """Collects key-values (through the gguf-py writer it exposes as `.kv`) and planned tensors,
    then writes everything to one path in a single pass over the tensors."""

    def __init__(self, arch: str) -> None:
        self.kv = gguf.GGUFWriter(path=None, arch=arch)
        self.tensors: list[PlannedTensor] = []

    def add_all(self, planned: list[PlannedTensor]) -> None:
        """Register tensors in source order, which is also the order they are laid out in the file."""
        for t in sorted(planned, key=source_key):
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


def source_key(t: PlannedTensor) -> tuple[str, int]:
    return str(t.source.file), t.source.offset


class OutputWriteError(Exception):
    """An OSError while writing an output (not while reading a source), with the output's final name:
    the path written is a temporary (/proc/self/fd/N), which means nothing to the user."""

    def __init__(self, error: OSError, target: Path) -> None:
        super().__init__(str(error))
        self.error, self.target = error, target


_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses in whole blocks (4 KiB covers 512 B disks)


class _Sink:
    """Sequential writer of one output file through a page-aligned staging buffer.

    With O_DIRECT the staged blocks go from our buffer to the disk without passing through the page
    cache: on the machines we measured, copying pages into the cache (what `cp`, copy_file_range and
    every buffered writer pay) ran at 250-800 MB/s while direct writes ran at ~1.2 GB/s. Where
    O_DIRECT is refused (tmpfs, some network file systems, macOS) the same buffer is written with
    plain write(2)."""

    def __init__(self, path: Path, header_len: int, size: int, target: Path, staging: int = 32 * 2**20) -> None:
        self.path, self.size, self.target = path, size, target
        with open(path, "rb") as f:
            header = f.read(header_len)
        self.fd, self.direct = self._open(path)
        self.buf = mmap.mmap(-1, staging)
        self.view = memoryview(self.buf)
        self.fill = 0  # bytes staged
        self.file_pos = 0  # bytes of the file already written (a multiple of _ALIGN while direct)
        self.put(memoryview(header))

    @staticmethod
    def _open(path: Path) -> tuple[int, bool]:
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            try:
                return os.open(path, os.O_WRONLY | flag), True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
        return os.open(path, os.O_WRONLY), False

    @property
    def position(self) -> int:
        return self.file_pos + self.fill

    def _flush(self, final: bool = False) -> None:
        try:
            self._write(final)
        except OSError as e:
            raise OutputWriteError(e, self.target) from None

    def _write(self, final: bool) -> None:
        n = self.fill if not self.direct else (self.fill if final else self.fill - self.fill % _ALIGN)
        if n == 0:
            return
        length = -(-n // _ALIGN) * _ALIGN if self.direct else n
        if length > n:
            self.view[n:length] = bytes(length - n)
        try:
            done = 0
            while done < length:
                done += os.pwritev(self.fd, [self.view[done:length]], self.file_pos + done)
        except OSError as e:
            if not self.direct or e.errno != errno.EINVAL:
                raise
            # the file system took O_DIRECT at open but not the write: go on buffered
            os.close(self.fd)
            self.fd, self.direct = os.open(self.path, os.O_WRONLY), False
            return self._write(final)
        rest = self.fill - n
        if rest:
            self.view[:rest] = self.view[n:self.fill]
        self.file_pos += n
        self.fill = rest

    def put(self, data: memoryview) -> None:
        while data:
            take = min(len(data), len(self.buf) - self.fill)
            self.view[self.fill:self.fill + take] = data[:take]
            self.fill += take
            data = data[take:]
            if self.fill == len(self.buf):
                self._flush()

    def read_from(self, src_fd: int, offset: int, count: int, on_bytes: Callable[[int], None]) -> None:
        while count > 0:
            room = len(self.buf) - self.fill
            n = os.preadv(src_fd, [self.view[self.fill:self.fill + min(room, count)]], offset)
            if n <= 0:
                raise EOFError("source file ended early")
            self.fill += n
            offset += n
            count -= n
            on_bytes(n)
            if self.fill == len(self.buf):
                self._flush()

    def close(self) -> None:
        try:
            self._flush(final=True)
            try:
                os.ftruncate(self.fd, self.size)  # drop the last block's padding
            except OSError as e:
                raise OutputWriteError(e, self.target) from None
        finally:
            os.close(self.fd)
            self.view.release()
            self.buf.close()


class TensorStream:
    """Writes the planned tensors of several StreamingGGUF files in one pass over the sources, in
    source order (file, offset): every output's tensors are laid out in that order too (see
    StreamingGGUF.add_all), so each output is written strictly sequentially."""

    def __init__(self, outputs: list[tuple[StreamingGGUF, Path, Path]]) -> None:
        self.outputs = outputs  # (file, path to write, final name for messages)

    def run(self, on_bytes: Callable[[int], None], on_tensor: Callable[[str], None]) -> None:
        sinks: list[_Sink] = []
        src_fds: dict[Path, int] = {}
        try:
            jobs = []
            for gg, path, target in self.outputs:
                try:
                    start = gg.write_header(path)
                    size = start + sum(t.padded_nbytes for t in gg.tensors)
                    sink = _Sink(path, start, size, target)
                except OSError as e:
                    raise OutputWriteError(e, target) from None
                sinks.append(sink)
                pos = start
                for t in gg.tensors:
                    jobs.append((t, sink, pos))
                    pos += t.padded_nbytes
            jobs.sort(key=lambda j: source_key(j[0]))
            for t, sink, pos in jobs:
                if sink.position != pos:
                    raise AssertionError(f"{t.name}: output order differs from source order")
                if t.is_raw_copy:
                    src = src_fds.get(t.source.file)
                    if src is None:
                        src = src_fds[t.source.file] = os.open(t.source.file, os.O_RDONLY)
                    sink.read_from(src, t.source.offset, t.nbytes, on_bytes)
                else:
                    data = t.data()
                    if data.nbytes != t.nbytes:
                        raise AssertionError(f"{t.name}: planned {t.nbytes} bytes, produced {data.nbytes}")
                    sink.put(memoryview(data).cast("B"))
                    on_bytes(t.nbytes)
                    del data
                pad = t.padded_nbytes - t.nbytes
                if pad:
                    sink.put(memoryview(bytes(pad)))
                on_tensor(t.name)
            while sinks:
                sinks.pop(0).close()  # off the list first: close() releases the fd even when it raises
        finally:
            for sink in sinks:  # only after a failure: the remaining files are partials anyway
                os.close(sink.fd)
            for fd in src_fds.values():
                os.close(fd)
