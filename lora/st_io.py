"""safetensors without loading whole files.

`SafetensorsFile` reads one tensor at a time (seek + readinto into a fresh tensor), so a merge
touches each input tensor only while it needs it and nothing stays mapped. `StreamWriter` writes
tensors as they are produced (one spool file per element size, assembled at the end so every
tensor stays aligned), so the output never has to be held in memory. `load_mapped` opens a file as
a dict of tensors backed by a private memory map (pages come from the file on demand).

The format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data buffer.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import uuid

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return _NAMES[dtype]


def read_header(path: str) -> tuple[dict, int, dict]:
    """(tensor entries, byte offset of the data buffer, metadata)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{os.path.basename(path)} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{os.path.basename(path)} is not a safetensors file (header size {n})")
        raw_header = f.read(n)
    name = os.path.basename(path)
    if len(raw_header) != n:
        raise ValueError(f"{name} is not a valid safetensors file (its header is cut short)")
    try:
        header = json.loads(raw_header)
    except ValueError:
        raise ValueError(f"{name} is not a valid safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name} is not a valid safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{name} is not a valid safetensors file (its metadata is not an object)")
    check_entries(name, header, os.path.getsize(path) - (8 + n))
    return header, 8 + n, meta


def check_entries(name: str, entries: dict, data_size: int) -> None:
    """Every entry's dtype, shape and data_offsets agree with each other and lie inside the data buffer
    (checked before anything is allocated; a file with lying offsets is refused, not half-read)."""
    for key, e in entries.items():
        if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
            raise ValueError(f"{name}: tensor {key!r} has an unsupported or missing dtype "
                             f"({e.get('dtype') if isinstance(e, dict) else e!r})")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
            raise ValueError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or any(not isinstance(o, int) or isinstance(o, bool) for o in offs) or not 0 <= offs[0] <= offs[1]):
            raise ValueError(f"{name}: tensor {key!r} has invalid data offsets {offs!r}")
        numel = 1
        for d in shape:
            numel *= d
        want = numel * torch.empty((), dtype=_DTYPES[e["dtype"]]).element_size()
        if offs[1] - offs[0] != want:
            raise ValueError(f"{name}: tensor {key!r} declares shape {shape} ({want} bytes) but its data offsets "
                             f"span {offs[1] - offs[0]} bytes")
        if offs[1] > data_size:
            raise ValueError(f"{name}: tensor {key!r} ends at byte {offs[1]} of a {data_size}-byte data buffer "
                             "(the file is truncated or its header lies)")


def read_metadata(path: str) -> dict:
    return read_header(path)[2]


class SafetensorsFile:
    """A read-only mapping name -> tensor that reads each tensor from disk when asked for it."""

    def __init__(self, path: str):
        self.path = path
        self.entries, self.data_start, self.metadata = read_header(path)
        for name, e in self.entries.items():
            if e["dtype"] not in _DTYPES:
                raise ValueError(f"{os.path.basename(path)}: tensor {name} has unsupported dtype {e['dtype']}")

    # mapping protocol -------------------------------------------------------------------------
    def keys(self):
        return self.entries.keys()

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def __contains__(self, name):
        return name in self.entries

    def get(self, name, default=None):
        return self[name] if name in self.entries else default

    def items(self):
        for k in self.entries:
            yield k, self[k]

    def shape(self, name) -> tuple:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name) -> torch.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def nbytes(self, name=None) -> int:
        if name is None:
            return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in self.entries.values())
        b, e = self.entries[name]["data_offsets"]
        return e - b

    def __getitem__(self, name) -> torch.Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(buf.numpy())
            if got != end - begin:
                raise ValueError(f"{os.path.basename(self.path)}: tensor {name} is truncated")
        return buf.view(dtype).reshape(e["shape"])


class LoraDict(dict):
    """A LORA_MODEL (name -> tensor dict, as core ComfyUI uses) that also carries where it came from."""
    path: str | None = None
    info: dict | None = None


def load_mapped(path: str) -> LoraDict:
    """All tensors of a file as views into one private (copy-on-write) memory map of it."""
    entries, start, meta = read_header(path)
    size = os.path.getsize(path)
    out = LoraDict()
    if size == 0:
        return out
    whole = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    for name, e in entries.items():
        begin, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        raw = whole[start + begin:start + end]
        item = torch.empty((), dtype=dtype).element_size()
        if (start + begin) % item:
            raw = raw.clone()  # misaligned in a foreign file: copy this one tensor
        out[name] = raw.view(dtype).reshape(e["shape"])
    out.path = path
    out.info = dict(meta)
    return out


class StreamWriter:
    """Write tensors one by one; finish() assembles the safetensors file (atomically renamed)."""

    def __init__(self, path: str, metadata: dict | None = None):
        self.path = path
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)     # a fresh models folder may not have embeddings/ or loras/ yet
        self._dir = tempfile.mkdtemp(prefix=".editkit-st-", dir=folder)
        self._spools: dict[int, tuple] = {}   # element size -> (file, [(name, dtype, shape, begin, end)], size)
        self._names: set = set()
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name}")
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        item = t.element_size()
        if item not in self._spools:
            f = open(os.path.join(self._dir, f"spool{item}"), "wb")
            self._spools[item] = (f, [], 0)
        f, entries, size = self._spools[item]
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        n = raw.numel()
        if n:
            f.write(memoryview(raw.numpy()))
        entries.append((name, dtype_name(t.dtype), list(t.shape), size, size + n))
        self._spools[item] = (f, entries, size + n)
        self.nbytes += n

    def finish(self) -> str:
        header, base = {}, 0
        order = sorted(self._spools, reverse=True)   # widest elements first keeps every tensor aligned
        for item in order:
            f, entries, size = self._spools[item]
            f.close()
            for name, dt, shape, b, e in entries:
                header[name] = {"dtype": dt, "shape": shape, "data_offsets": [base + b, base + e]}
            base += size
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - len(raw) % 8) % 8)
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.part"
        try:
            with open(tmp, "wb") as out:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                for item in order:
                    with open(os.path.join(self._dir, f"spool{item}"), "rb") as src:
                        shutil.copyfileobj(src, out, 16 * 1024 * 1024)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
            shutil.rmtree(self._dir, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        for f, _, _ in self._spools.values():
            f.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def save(tensors, path: str, metadata: dict | None = None) -> str:
    """Write a mapping of tensors (streamed one at a time)."""
    w = StreamWriter(path, metadata)
    try:
        for name in tensors.keys():
            w.add(name, tensors[name])
    except BaseException:
        w.abort()
        raise
    return w.finish()
