"""A pickle-free byte format for named tensors plus JSON metadata.

Layout: magic b"LRUT", format version (u32), header length (u64), a UTF-8 JSON header, then
the raw little-endian tensor bytes. Decoding parses JSON and copies bytes into tensors of
whitelisted dtypes after checking every offset and size, so untrusted bytes can at worst be
rejected — nothing in them is ever executed.

A fleet stores one record per line, and thousands of lines are written and read per file:
`encode_lines` and `decode_lines` do that for all lines at once (one header, one array of
bodies), giving and taking the same bytes as `encode` and `decode` line by line.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, NamedTuple

import torch

MAGIC = b"LRUT"
VERSION = 1
_PREFIX = struct.Struct("<4sIQ")
_MAX_HEADER_BYTES = 16 << 20

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _DTYPES.values()}


class CodecError(ValueError):
    """The bytes are not a valid tensor record."""


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> bytes:
    entries, blobs, offset = [], [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise TypeError(f"codec: tensor {name!r} has unsupported dtype {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        entries.append(
            {
                "name": name,
                "dtype": _NAMES[tensor.dtype],
                "shape": list(data.shape),
                "offset": offset,
                "nbytes": len(raw),
            }
        )
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps({"meta": meta or {}, "tensors": entries}, sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + b"".join(blobs)


def encode_lines(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> list[bytes]:
    """One record per line of tensors whose dimension 0 is the line (each (B, ...)): record b is
    the bytes `encode` gives for {name: tensor[b : b + 1]}, every line's tensors keeping a
    leading dimension of 1. Built from one header and one (B, body bytes) array."""
    lines = {tensor.shape[0] for tensor in tensors.values() if tensor.dim() > 0}
    if len(lines) != 1 or any(tensor.dim() == 0 for tensor in tensors.values()):
        raise ValueError(f"codec.encode_lines: tensors need one leading line dimension, got {len(lines)} sizes")
    count = lines.pop()
    if count == 0:
        return []
    entries, bodies, offset = [], [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise TypeError(f"codec: tensor {name!r} has unsupported dtype {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous()
        nbytes = math.prod(data.shape[1:]) * _ITEMSIZE[data.dtype]
        shape = [1, *data.shape[1:]]
        entries.append({"name": name, "dtype": _NAMES[data.dtype], "shape": shape, "offset": offset, "nbytes": nbytes})
        if nbytes:
            bodies.append(data.reshape(count, -1).view(torch.uint8))
        offset += nbytes
    header = json.dumps({"meta": meta or {}, "tensors": entries}, sort_keys=True).encode()
    start = _PREFIX.pack(MAGIC, VERSION, len(header)) + header
    if not bodies:
        return [start] * count
    return [start + row.tobytes() for row in torch.cat(bodies, dim=1).numpy()]


class LineGroup(NamedTuple):
    """Records of several lines that share one layout, read together (`decode_lines`)."""

    lines: list[int]  # their positions in the list of records given
    tensors: dict[str, torch.Tensor]  # each (len(lines), ...): line i's tensors at row i
    meta: dict[str, Any]


def decode_lines(records: list[bytes | None]) -> list[LineGroup]:
    """The records of many lines (None: a line without one), read once per layout: records
    with the same header and length are one group, its first record checked as `decode`
    checks any record and the others read from one array of their bodies. Tensors stored with
    a leading dimension of 1 (as `encode_lines` writes them) come back stacked along it; a
    record whose tensors are not all of that shape is a group of its own, as `decode` reads it."""
    layouts: dict[bytes, list[int]] = {}
    for index, data in enumerate(records):
        if not data:
            continue
        if len(data) < _PREFIX.size:
            raise CodecError(f"codec: {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
        header_len = _PREFIX.unpack_from(data)[2]
        key = bytes(data[: _PREFIX.size + min(header_len, _MAX_HEADER_BYTES)]) + struct.pack("<Q", len(data))
        layouts.setdefault(key, []).append(index)
    groups = []
    for key, lines in layouts.items():
        tensors, meta = decode(records[lines[0]])
        if len(lines) == 1 or any(tensor.shape[:1] != (1,) for tensor in tensors.values()):
            groups.extend(LineGroup([i], *decode(records[i])) for i in lines)
            continue
        body_start = len(key) - 8
        joined = bytearray(b"".join(memoryview(records[i])[body_start:] for i in lines))
        bodies = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        bodies = bodies.reshape(len(lines), -1)
        entries = json.loads(records[lines[0]][_PREFIX.size : body_start].decode())["tensors"]
        stacked = {}
        for entry in entries:
            tensor = tensors[entry["name"]]
            part = bodies[:, entry["offset"] : entry["offset"] + entry["nbytes"]]
            stacked[entry["name"]] = (
                part.contiguous().view(tensor.dtype).reshape(len(lines), *tensor.shape[1:])
                if entry["nbytes"]
                else torch.empty((len(lines), *tensor.shape[1:]), dtype=tensor.dtype)
            )
        groups.append(LineGroup(lines, stacked, meta))
    return groups


def decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if len(data) < _PREFIX.size:
        raise CodecError(f"codec: {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"codec: bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"codec: format version {version} is not supported (expected {VERSION})")
    body_start = _PREFIX.size + header_len
    if header_len > _MAX_HEADER_BYTES or body_start > len(data):
        raise CodecError(f"codec: header length {header_len} does not fit in {len(data)} bytes")
    try:
        header = json.loads(data[_PREFIX.size : body_start].decode())
        entries = header["tensors"]
        meta = header["meta"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CodecError(f"codec: unreadable header ({error})") from error
    if not isinstance(entries, list) or not isinstance(meta, dict):
        raise CodecError("codec: header must hold a list of tensors and a meta object")
    body = memoryview(data)[body_start:]
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        tensors[_field(entry, "name", str)] = _read_tensor(entry, body)
    return tensors, meta


def _field(entry: Any, key: str, kind: type) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind):
        raise CodecError(f"codec: tensor entry {entry!r} lacks a valid {key!r}")
    return entry[key]


def _read_tensor(entry: dict, body: memoryview) -> torch.Tensor:
    name = entry.get("name")
    dtype = _DTYPES.get(_field(entry, "dtype", str))
    if dtype is None:
        raise CodecError(f"codec: tensor {name!r} has a dtype outside the allowed set {sorted(_DTYPES)}")
    shape = _field(entry, "shape", list)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CodecError(f"codec: tensor {name!r} has an invalid shape {shape!r}")
    offset, nbytes = _field(entry, "offset", int), _field(entry, "nbytes", int)
    itemsize = _ITEMSIZE[dtype]
    if nbytes != math.prod(shape) * itemsize or offset < 0 or offset + nbytes > len(body):
        raise CodecError(f"codec: tensor {name!r} claims {nbytes} bytes at {offset}, which does not fit")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # One copy out of the (read-only) record, into a buffer the tensor then owns.
    raw = bytearray(body[offset : offset + nbytes])
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
