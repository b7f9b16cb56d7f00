"""Streaming safetensors I/O: read a (sharded) checkpoint's index and write shards tensor by tensor.

Memory does not grow with the model: the reader looks at headers only (tensor bytes are read one
tensor at a time, or copied file-to-file when untouched), and the writer lays out every shard's
header up front so that each tensor is written and dropped as soon as it is computed.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_deploy.errors import InputError

if TYPE_CHECKING:  # torch is imported lazily: `lora-deploy --help` must not pay for it
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names and their sizes in bytes
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
# the floating-point safetensors dtypes, and the torch dtype name of each one a checkpoint can be written in
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
TORCH_TO_CODE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# bytes per value of every dtype name vLLM and lora-deploy use (torch names, vLLM's fp8/int8)
DTYPE_BYTES = {
    **{name: DTYPE_SIZES[code] for name, code in TORCH_TO_CODE.items()},
    "fp8": 1,
    "float8_e4m3fn": 1,
    "int8": 1,
}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """Where one tensor lies: file, dtype (safetensors name), shape, and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header without reading tensor data, as strictly as safetensors' own reader (what vLLM and
    transformers load with): an object of tensor entries and an optional ``__metadata__`` of strings; each entry a
    known dtype, a shape of non-negative integers and ``data_offsets`` [begin, end] whose length is the shape's
    bytes; the entries, sorted by offset, tile the data region exactly (no gap, no overlap, nothing past the end, no
    bytes left over). Every violation is an InputError naming the file and the tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes)")
            text = f.read(n)
        if not text.lstrip(b" ").startswith(b"{"):
            raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise InputError(f"{path}: corrupt safetensors header ({what})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, base, name, info)
    cursor = base
    for t in sorted(entries.values(), key=lambda t: (t.start, t.end)):
        if t.start != cursor:
            what = "overlaps the tensor before it" if t.start < cursor else f"leaves a gap of {t.start - cursor} bytes"
            raise InputError(
                f"{path}: corrupt safetensors header: tensor {t.name!r} {what} (data_offsets must tile the data region)"
            )
        cursor = t.end
    if cursor > size:
        raise InputError(
            f"{path}: truncated: the tensors end at byte {cursor}, the file has {size}",
            hint="the download or copy was interrupted; fetch the file again",
        )
    if cursor != size:
        raise InputError(f"{path}: corrupt safetensors file: {size - cursor} bytes after the last tensor")
    return entries, metadata


def _entry(path: Path, base: int, name: str, info: object) -> TensorEntry:
    """One header entry, every field checked (type, dtype, shape, offsets, size)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{where}: malformed header entry (needs exactly dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputError(f"{where}: unknown dtype {dtype!r}", hint=f"safetensors dtypes: {', '.join(DTYPE_SIZES)}")
    ints = (
        isinstance(shape, list)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(v) is int for v in [*shape, *offsets])
    )
    if not ints or any(v < 0 for v in [*shape, *offsets]):
        raise InputError(f"{where}: shape and data_offsets must be lists of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise InputError(f"{where}: data_offsets begin {begin} is after end {end}")
    count = 1
    for d in shape:
        count *= d
    if count * DTYPE_SIZES[dtype] != end - begin:
        raise InputError(
            f"{where}: {end - begin} bytes for shape {shape} of {dtype} ({count * DTYPE_SIZES[dtype]} expected)"
        )
    return TensorEntry(name=name, file=path, dtype=dtype, shape=tuple(shape), start=base + begin, end=base + end)


@dataclass(frozen=True)
class ShardIndex:
    """Every tensor of a checkpoint folder, from ``model.safetensors`` or its sharded index."""

    folder: Path
    files: tuple[Path, ...]
    tensors: dict[str, TensorEntry]

    @classmethod
    def from_folder(cls, folder: Path) -> ShardIndex:
        index_file = folder / SAFETENSORS_INDEX
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{index_file}: malformed index ({e})") from e
            files = sorted({folder / f for f in weight_map.values()}, key=_shard_order)
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{index_file} names shards that are missing: {', '.join(missing)}")
        else:
            files = sorted(folder.glob("*.safetensors"), key=_shard_order)
            if not files:
                pickles = sorted(p.name for p in folder.glob("*.bin"))
                hint = (
                    ("convert it to safetensors first (transformers: save_pretrained(..., safe_serialization=True))")
                    if pickles
                    else None
                )
                raise InputError(
                    f"{folder}: no safetensors weights found"
                    + (f" (only pickle files: {', '.join(pickles)})" if pickles else ""),
                    hint=hint,
                )
        tensors: dict[str, TensorEntry] = {}
        for f in files:
            entries, _ = read_header(f)
            for name, entry in entries.items():
                if name in tensors:
                    raise InputError(f"tensor {name!r} appears in both {tensors[name].file.name} and {f.name}")
                tensors[name] = entry
        return cls(folder, tuple(files), tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _shard_order(p: Path) -> tuple:
    m = re.search(r"(\d+)-of-(\d+)", p.name)
    return (int(m.group(1)), p.name) if m else (0, p.name)


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units as the hub uses them, binary with 'i')."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise InputError(f"invalid size {text!r}", hint="use a number with a unit, such as 5GB or 500MB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = " KMGT".index(unit) if unit else 0
    value = int(num * ((1024 if binary else 1000) ** power))
    if value <= 0:
        raise InputError(f"size {text!r} must be positive")
    return value


# ---------------------------------------------------------------- tensor <-> bytes


def torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    if name not in table:
        raise InputError(f"unsupported safetensors dtype {name}")
    return table[name]


def st_dtype(dtype: torch.dtype) -> str:
    import torch

    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
    }[dtype]


class TensorReader:
    """The one way tensors are read from safetensors files: plain reads, one tensor at a time.

    Files stay open between reads (a merge reads thousands of tensors from a few shards). With
    ``reuse=True`` a read lands in one growing buffer that the next read overwrites, so streaming a
    checkpoint touches the same memory over and over instead of page-faulting through fresh allocations.
    No mmap is kept alive, so memory does not grow with the model.
    """

    def __init__(self) -> None:
        self._files: dict[Path, io.FileIO] = {}
        self._buffer = bytearray()

    def read(self, entry: TensorEntry, *, reuse: bool = False) -> torch.Tensor:
        """The tensor's values (a view of the shared buffer with ``reuse``, valid until the next read)."""
        import torch

        dtype = torch_dtype(entry.dtype)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        if reuse:
            if len(self._buffer) < entry.nbytes:
                self._buffer = bytearray(entry.nbytes)
            buf = self._buffer
        else:
            buf = bytearray(entry.nbytes)
        f = self._files.get(entry.file)
        if f is None:
            f = self._files[entry.file] = open(entry.file, "rb", buffering=0)
        f.seek(entry.start)
        view, got = memoryview(buf), 0
        while got < entry.nbytes:
            n = f.readinto(view[got : entry.nbytes])
            if not n:
                raise InputError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
            got += n
        count = entry.nbytes // torch.empty(0, dtype=dtype).element_size()
        return torch.frombuffer(buf, dtype=dtype, count=count).reshape(entry.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into a fresh CPU tensor (for the few callers that read a tensor or two)."""
    with TensorReader() as reader:
        return reader.read(entry)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes without copying more than once."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())  # type: ignore[arg-type]  # numpy arrays are buffers


# ---------------------------------------------------------------- writer


@dataclass
class OutputShard:
    """One output file: the tensors it holds, in order, with their dtype and shape."""

    tensors: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(specs: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int) -> list[OutputShard]:
    """Group (name, dtype, shape) in order into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[OutputShard] = [OutputShard()]
    for name, dtype, shape in specs:
        n = _numel(shape) * DTYPE_SIZES[dtype]
        if shards[-1].tensors and shards[-1].nbytes + n > max_shard_bytes:
            shards.append(OutputShard())
        shards[-1].tensors.append((name, dtype, shape))
        shards[-1].nbytes += n
    return shards


def shard_filenames(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShardWriter:
    """Write planned shards tensor by tensor into ``folder``; verifies every tensor lands where planned.

    The header of each file is written first (offsets are known from the plan), so no shard is ever
    buffered in memory. Call :meth:`write` once per tensor, in plan order, then :meth:`close`.
    """

    def __init__(self, folder: Path, shards: list[OutputShard], metadata: dict[str, str] | None = None):
        self.folder = folder
        self.shards = shards
        self.names = shard_filenames(len(shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, t) for i, s in enumerate(shards) for t in s.tensors]
        self._pos = 0
        self._file: io.FileIO | None = None
        self._file_idx = -1
        self.bytes_written = 0

    def _open(self, idx: int) -> None:
        if self._file:
            self._file.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape in self.shards[idx].tensors:
            n = _numel(shape) * DTYPE_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align data to 8 bytes, as the reference writer does
        self._file = open(self.folder / self.names[idx], "wb", buffering=0)  # raw: copy_file_range mixes in
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file_idx = idx

    def _next(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self._pos >= len(self._order):
            raise RuntimeError(f"tensor {name} was not planned")
        idx, (pname, pdtype, pshape) = self._order[self._pos]
        if (pname, pdtype, pshape) != (name, dtype, tuple(shape)):
            raise RuntimeError(f"writer expected {pname} {pdtype}{list(pshape)}, got {name} {dtype}{list(shape)}")
        if idx != self._file_idx:
            self._open(idx)
        self._pos += 1

    def _current(self) -> io.FileIO:
        if self._file is None:
            raise RuntimeError("no shard is open: write tensors in the planned order")
        return self._file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._next(name, st_dtype(tensor.dtype), tuple(tensor.shape))
        data = tensor_bytes(tensor)
        out, written = self._current(), 0
        while written < data.nbytes:  # a raw file may write less than asked
            written += out.write(data[written:]) or 0
        self.bytes_written += data.nbytes

    def copy_raw(self, name: str, entry: TensorEntry, chunk: int = 8 << 20) -> None:
        """Copy an untouched tensor's bytes straight from its source file (in-kernel where the OS allows)."""
        self._next(name, entry.dtype, entry.shape)
        out = self._current()
        with open(entry.file, "rb", buffering=0) as src:
            left, offset = entry.nbytes, entry.start
            if hasattr(os, "copy_file_range"):
                try:
                    while left:
                        n = os.copy_file_range(src.fileno(), out.fileno(), min(left, 1 << 30), offset)
                        if n == 0:
                            raise InputError(f"{entry.file}: truncated while copying tensor {entry.name!r}")
                        left, offset = left - n, offset + n
                except OSError:
                    pass  # e.g. a file system without copy_file_range: finish with plain reads below
            src.seek(offset)
            while left:
                block = src.read(min(chunk, left))
                if not block:
                    raise InputError(f"{entry.file}: truncated while copying tensor {entry.name!r}")
                out.write(block)
                left -= len(block)
        self.bytes_written += entry.nbytes

    def close(self) -> None:
        if self._pos != len(self._order):
            missing = self._order[self._pos][1][0]
            raise RuntimeError(f"writer closed before tensor {missing} was written")
        if self._file:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            weight_map = {name: self.names[i] for i, s in enumerate(self.shards) for name, _, _ in s.tensors}
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.shards)}, "weight_map": weight_map}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
