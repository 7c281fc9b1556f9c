"""Reads tensors from (possibly sharded) safetensors files one at a time.

The `safetensors` package's numpy reader cannot return bfloat16 tensors,
which most Gemma checkpoints hold, so tensors are memory-mapped here from
the documented layout (an 8-byte little-endian header size, a JSON header
with dtype, shape and byte offsets, then the raw data) and viewed with
`ml_dtypes` (a Keras dependency) where numpy has no such type.
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
