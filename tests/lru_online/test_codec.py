import pickle
import struct

import pytest
import torch

from lru_online import RecurrentState
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
