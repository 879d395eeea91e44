import pickle
import struct

import pytest
import torch

from lru_online import RecurrentState, codec
from lru_online.codec import CodecError, decode, encode


def test_round_trip_keeps_values_dtypes_and_meta():
    tensors = {
        "a": torch.randn(3, 4, dtype=torch.complex64),
        "b": torch.arange(5),
        "empty": torch.zeros(0, 2),
        "flag": torch.tensor([True, False]),
    }
    restored, meta = decode(encode(tensors, {"step": 3}))
    assert meta == {"step": 3}
    for name, tensor in tensors.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor)


class _Exploit:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle payload executed')",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(_Exploit()),
        b"",
        b"LRUT",
        b"NOPE" + b"\0" * 20,
        struct.pack("<4sIQ", b"LRUT", 1, 10**9) + b"{}",
        struct.pack("<4sIQ", b"LRUT", 1, 2) + b"{}",
        struct.pack("<4sIQ", b"LRUT", 1, 9) + b"not json!",
    ],
)
def test_untrusted_bytes_are_rejected_not_executed(payload):
    with pytest.raises(CodecError):
        RecurrentState.from_bytes(payload)


def test_lying_sizes_and_dtypes_are_rejected():
    good = encode(
        {"hidden.0": torch.zeros(1, 2, dtype=torch.complex64)},
        {"kind": "RecurrentState", "layers": 1},
    )
    header_len = struct.unpack_from("<4sIQ", good)[2]
    header = good[16 : 16 + header_len]
    for old, new in [
        (b'"nbytes": 16', b'"nbytes": 99'),
        (b'"complex64"', b'"object"'),
        (b'"offset": 0', b'"offset": -8'),
    ]:
        forged = header.replace(old, new)
        data = struct.pack("<4sIQ", b"LRUT", 1, len(forged)) + forged + good[16 + header_len :]
        with pytest.raises(CodecError):
            RecurrentState.from_bytes(data)


def _line_tensors(lines: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden.0": torch.randn(lines, 4, dtype=torch.complex64, generator=generator),
        "last_forecast": torch.randn(lines, 1, 3, generator=generator),
        "mixture.losses": torch.randn(lines, 3, 1, 3, dtype=torch.float64, generator=generator),
        "flags": torch.rand(lines, 2, generator=generator) > 0.5,
        "none": torch.zeros(lines, 0),
    }


def test_lines_are_written_as_each_line_alone_would_be():
    """encode_lines gives, byte for byte, what `encode` gives for each line's tensors alone."""
    tensors = _line_tensors(5)
    meta = {"kind": "RecurrentState", "layers": 1}
    written = codec.encode_lines(tensors, meta)
    assert written == [codec.encode({k: v[b : b + 1] for k, v in tensors.items()}, meta) for b in range(5)]
    assert codec.encode_lines({"x": torch.zeros(0, 3)}) == []
    with pytest.raises(ValueError, match="leading line dimension"):
        codec.encode_lines({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)})


def test_lines_are_read_back_grouped_by_layout():
    """Records of one layout come back stacked in their order; a line without a record is in no
    group, and a record of another layout or shape is a group of its own, read as `decode` does."""
    tensors = _line_tensors(4, seed=1)
    written = codec.encode_lines(tensors, {"kind": "k"})
    other = codec.encode_lines({"y": torch.arange(6.0).reshape(2, 3)}, {"kind": "other"})
    whole = codec.encode({"z": torch.ones(2, 2)})  # not one line's record: read as stored
    records = [written[0], None, other[0], written[1], whole, written[2], other[1], written[3]]
    groups = {tuple(group.lines): group for group in codec.decode_lines(records)}
    assert set(groups) == {(0, 3, 5, 7), (2, 6), (4,)}
    for name, tensor in tensors.items():
        assert torch.equal(groups[(0, 3, 5, 7)].tensors[name], tensor)
        assert groups[(0, 3, 5, 7)].tensors[name].dtype == tensor.dtype
    assert torch.equal(groups[(2, 6)].tensors["y"], torch.arange(6.0).reshape(2, 3))
    assert groups[(2, 6)].meta == {"kind": "other"}
    assert torch.equal(groups[(4,)].tensors["z"], torch.ones(2, 2))


def test_a_damaged_record_among_many_is_rejected():
    written = codec.encode_lines(_line_tensors(3), {"kind": "k"})
    with pytest.raises(codec.CodecError):
        codec.decode_lines([written[0], written[1][:30], written[2]])
    with pytest.raises(codec.CodecError):
        codec.decode_lines([written[0], b"LRUT" + written[1][4:10]])
