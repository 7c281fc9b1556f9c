"""Reads and writes (possibly sharded) safetensors files one tensor at a time.

The `safetensors` package's numpy reader cannot return bfloat16 tensors,
which most Gemma checkpoints hold, so tensors are memory-mapped here from
the documented layout (an 8-byte little-endian header size, a JSON header
with dtype, shape and byte offsets, then the raw data) and viewed with
`ml_dtypes` (a Keras dependency) where numpy has no such type. The writer
produces the same layout, streaming one tensor at a time, and shards the
way transformers does (`model-00001-of-00002.safetensors` plus
`model.safetensors.index.json`).
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsCheckpoint:
    """The tensors of one checkpoint, keyed by name, across all its shards.

    Args:
        paths: the `.safetensors` files of the checkpoint.

    Example:

    >>> import numpy as np, safetensors.numpy, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> safetensors.numpy.save_file({"w": np.ones((2, 3), "float32")}, path)
    >>> checkpoint = SafetensorsCheckpoint([path])
    >>> checkpoint.shape("w"), checkpoint.get("w").sum()
    ((2, 3), np.float32(6.0))
    """

    def __init__(self, paths):
        self._entries = {}
        for path in paths:
            with open(path, "rb") as file:
                (header_size,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(header_size))
            data_start = 8 + header_size
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(
                        f"Tensor {key!r} in {path} has dtype {entry['dtype']}, "
                        f"which is not supported (supported: {sorted(_DTYPES)})."
                    )
                self._entries[key] = (path, data_start, entry)

    def keys(self):
        return self._entries.keys()

    def __contains__(self, key):
        return key in self._entries

    def shape(self, key):
        return tuple(self._entries[key][2]["shape"])

    def get(self, key):
        """Returns the tensor as a read-only memory-mapped numpy array."""
        path, data_start, entry = self._entries[key]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(
            path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape
        )


def checkpoint_files(directory):
    """The safetensors files of a transformers directory, index first."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as file:
            weight_map = json.load(file)["weight_map"]
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(
            name for name in os.listdir(directory) if name.endswith(".safetensors")
        )
    if not names:
        raise ValueError(
            f"No `*.safetensors` weights found in {directory!r}: a transformers "
            "checkpoint needs `model.safetensors` or sharded files with "
            "`model.safetensors.index.json`."
        )
    paths = [os.path.join(directory, name) for name in names]
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"Weight shard {path!r} named in the index is missing.")
    return paths


_DTYPE_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


def parse_size(size):
    """Bytes in `size`: an int, or a string such as `"5GB"`, `"200MB"`, `"20KB"`.

    Example:

    >>> parse_size("2GB"), parse_size("20KB"), parse_size(1000)
    (2000000000, 20000, 1000)
    """
    if isinstance(size, bool):
        raise ValueError(f"`max_shard_size` must be a size, got {size!r}.")
    if isinstance(size, (int, np.integer)):
        if size <= 0:
            raise ValueError(f"`max_shard_size` must be positive, got {size}.")
        return int(size)
    if isinstance(size, str):
        text = size.strip().upper().replace(" ", "")
        units = {"GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "GB": 10**9}
        units.update({"MB": 10**6, "KB": 10**3, "B": 1})
        for unit, factor in units.items():
            if text.endswith(unit):
                number = text[: -len(unit)]
                try:
                    value = float(number)
                except ValueError:
                    break
                if value > 0:
                    return int(value * factor)
                break
    raise ValueError(
        f"`max_shard_size` must be a positive number of bytes or a string like "
        f"'5GB' or '500MB', got {size!r}."
    )


def _dtype_name(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(
            f"Cannot write dtype {dtype} to safetensors (supported: "
            f"{sorted(str(np.dtype(d)) for d in _DTYPES.values())})."
        )
    return _DTYPE_NAMES[dtype]


def _write_file(path, entries, metadata):
    """Writes one safetensors file from `(name, shape, dtype, produce)`."""
    header = {}
    offset = 0
    for name, shape, dtype, _ in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _dtype_name(dtype),
            "shape": [int(dim) for dim in shape],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The data must start 8-byte aligned.
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name, shape, dtype, produce in entries:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if tuple(array.shape) != tuple(shape):
                raise ValueError(
                    f"Tensor {name!r} has shape {array.shape}, announced {shape}."
                )
            file.write(array.tobytes())
        file.flush()
        os.fsync(file.fileno())


def write_safetensors(
    directory,
    entries,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    metadata=None,
    base_name="model",
):
    """Writes tensors into `directory`, sharded when they exceed a size.

    Tensors are produced one at a time, so peak memory stays near the
    largest tensor.

    Args:
        directory: an existing directory.
        entries: a list of `(name, shape, dtype, produce)` where `produce()`
            returns the array (called once, while writing).
        max_shard_size: bytes per file (int or a string like `"5GB"`). Above
            it, `{base_name}-00001-of-0000N.safetensors` files and a
            `{base_name}.safetensors.index.json` are written.
        metadata: string key/value pairs for the header (`{"format": "pt"}`).
        base_name: file name stem.

    Returns:
        The names of the files written.

    Example:

    >>> import numpy as np, tempfile
    >>> directory = tempfile.mkdtemp()
    >>> write_safetensors(directory, [("w", (2,), np.float32, lambda: np.ones(2))])
    ['model.safetensors']
    >>> SafetensorsCheckpoint(checkpoint_files(directory)).get("w").tolist()
    [1.0, 1.0]
    """
    limit = parse_size(max_shard_size)
    shards = [[]]
    shard_size = 0
    total = 0
    for entry in entries:
        size = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
        if shards[-1] and shard_size + size > limit:
            shards.append([])
            shard_size = 0
        shards[-1].append(entry)
        shard_size += size
        total += size
    if len(shards) == 1:
        names = [f"{base_name}.safetensors"]
    else:
        count = len(shards)
        names = [
            f"{base_name}-{index + 1:05d}-of-{count:05d}.safetensors"
            for index in range(count)
        ]
    for name, shard in zip(names, shards):
        _write_file(os.path.join(directory, name), shard, metadata)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {
                entry[0]: name for name, shard in zip(names, shards) for entry in shard
            },
        }
        with open(
            os.path.join(directory, f"{base_name}.safetensors.index.json"), "w"
        ) as f:
            json.dump(index, f, indent=2)
        names.append(f"{base_name}.safetensors.index.json")
    return names
