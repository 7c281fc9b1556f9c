"""GGUF files (llama.cpp): configuration, tensors and their mapping.

A GGUF file is a header (magic `GGUF`, version, tensor and key/value
counts), key/value metadata, one record per tensor (name, dimensions with
the fastest-varying first, type, offset), then the tensor data, aligned to
`general.alignment` (32 by default). This module reads the header with a
small parser of its own (fast: it skips the 262k-token vocabulary arrays
that `gguf.GGUFReader` turns into Python objects) and dequantizes tensors
with `gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q5_0, Q4_K, Q6_K and
every other type the `gguf` package knows).

Gemma GGUF tensors, in numpy order (dimensions reversed), have the shapes
transformers uses, so the mapping goes through the transformers names:

| GGUF | transformers |
|---|---|
| `token_embd` | `embed_tokens` |
| `blk.N.attn_norm` | `layers.N.input_layernorm` |
| `blk.N.attn_q` / `attn_k` / `attn_v` | `self_attn.q_proj` / `k_proj` / `v_proj` |
| `blk.N.attn_output` | `self_attn.o_proj` |
| `blk.N.attn_q_norm` / `attn_k_norm` | `self_attn.q_norm` / `k_norm` |
| `blk.N.post_attention_norm` | `post_attention_layernorm` |
| `blk.N.ffn_norm` | `pre_feedforward_layernorm` (Gemma 1: `post_attention_layernorm`) |
| `blk.N.ffn_gate` / `ffn_up` / `ffn_down` | `mlp.gate_proj` / `up_proj` / `down_proj` |
| `blk.N.post_ffw_norm` | `post_feedforward_layernorm` |
| `output_norm` | `norm` |

llama.cpp's converter stores Gemma's norm weights with 1 added (it applies
`x * w` where Gemma applies `x * (1 + w)`); 1 is subtracted on import.

Metadata keys are prefixed by the architecture (`gemma`, `gemma2`,
`gemma3`). Gemma 3 files carry no local RoPE base, layer pattern or query
scaling: Gemma 3's defaults apply (local base 10k, every sixth layer global,
queries scaled by head_dim except the 27B's hidden/heads).
"""

import concurrent.futures
import mmap
import os
import struct

import ml_dtypes
import numpy as np

from keras_gemma.checkpoints.variables import aligned_empty, assign

ARCHITECTURES = ("gemma", "gemma2", "gemma3")

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING = 8
_ARRAY = 9
# Arrays up to this many items are kept (per-layer settings); longer ones
# (the vocabulary) are skipped.
_MAX_KEPT_ARRAY = 4096

# ggml types numpy can view directly: F32, F16, F64, BF16.
_PLAIN_TYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("<f2"),
    28: np.dtype("<f8"),
    30: np.dtype(ml_dtypes.bfloat16),
}

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


class GGUFFile:
    """The metadata and tensors of a GGUF file, memory-mapped.

    Args:
        path: the `.gguf` file.

    Example (any GGUF file):

    ```python
    with GGUFFile("gemma-3-270m-q4_k_m.gguf") as gguf_file:
        gguf_file.metadata["general.architecture"]     # 'gemma3'
        gguf_file.tensor_type("token_embd.weight")     # 'Q8_0'
        gguf_file.tensor("output_norm.weight").shape   # (640,)
    ```
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError) as error:
            self.close()
            raise ValueError(
                f"{self.path} is not a readable GGUF file: {error}."
            ) from error
        except BaseException:
            self.close()
            raise

    # -- parsing ------------------------------------------------------------

    def _unpack(self, fmt):
        values = struct.unpack_from(fmt, self._map, self._offset)
        self._offset += struct.calcsize(fmt)
        return values[0]

    def _string(self):
        length = self._unpack("<Q")
        start = self._offset
        self._offset += length
        if self._offset > len(self._map):
            raise struct.error("a string runs past the end of the file")
        return self._map[start : self._offset].decode("utf-8")

    def _skip_strings(self, count):
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", self._map, self._offset)
            self._offset += 8 + length

    def _value(self, value_type):
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type = self._unpack("<I")
            count = self._unpack("<Q")
            if item_type in _SCALARS:
                size = struct.calcsize(_SCALARS[item_type])
                start = self._offset
                self._offset += size * count
                if count > _MAX_KEPT_ARRAY:
                    return None
                dtype = np.dtype(_SCALARS[item_type])
                return np.frombuffer(self._map, dtype, count, start).tolist()
            if item_type == _STRING and count > _MAX_KEPT_ARRAY:
                self._skip_strings(count)
                return None
            return [self._value(item_type) for _ in range(count)]
        if value_type not in _SCALARS:
            raise struct.error(f"unknown metadata value type {value_type}")
        return self._unpack(_SCALARS[value_type])

    def _parse(self):
        self._offset = 0
        if self._map[:4] != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (wrong magic bytes).")
        self._offset = 4
        self.version = self._unpack("<I")
        if self.version < 2:
            raise ValueError(
                f"{self.path} is GGUF version {self.version}; versions 2 and 3 are "
                "supported. Convert it again with a recent llama.cpp."
            )
        tensor_count = self._unpack("<Q")
        kv_count = self._unpack("<Q")
        self.metadata = {}
        for _ in range(kv_count):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))
        self._tensors = {}
        for _ in range(tensor_count):
            name = self._string()
            n_dims = self._unpack("<I")
            dims = [self._unpack("<Q") for _ in range(n_dims)]
            ggml_type = self._unpack("<I")
            offset = self._unpack("<Q")
            self._tensors[name] = (dims, ggml_type, offset)
        alignment = int(self.metadata.get("general.alignment") or 32)
        self._data_start = self._offset + (-self._offset % alignment)

    # -- access -------------------------------------------------------------

    def close(self):
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def tensor_names(self):
        return list(self._tensors)

    def __contains__(self, name):
        return name in self._tensors

    def shape(self, name):
        """The numpy shape of a tensor (GGUF dimensions reversed)."""
        return tuple(int(dim) for dim in reversed(self._tensors[name][0]))

    def tensor_type(self, name):
        """The ggml type name of a tensor, e.g. `'Q4_K'`."""
        ggml_type = self._tensors[name][1]
        try:
            from gguf import GGMLQuantizationType

            return GGMLQuantizationType(ggml_type).name
        except (ImportError, ValueError):
            names = {0: "F32", 1: "F16", 28: "F64", 30: "BF16"}
            return names.get(ggml_type, str(ggml_type))

    def tensor(self, name):
        """The tensor as a float array in numpy order (dequantized: float32)."""
        dims, ggml_type, offset = self._tensors[name]
        shape = tuple(int(dim) for dim in reversed(dims))
        count = int(np.prod(shape, dtype=np.int64))
        start = self._data_start + offset
        if ggml_type in _PLAIN_TYPES:
            dtype = _PLAIN_TYPES[ggml_type]
            return np.frombuffer(self._map, dtype, count, start).reshape(shape).copy()
        try:
            from gguf import GGMLQuantizationType
            from gguf.constants import GGML_QUANT_SIZES
        except ImportError as error:
            raise ImportError(
                f"Tensor {name!r} of {self.path} is quantized; reading it needs the "
                "`gguf` package: pip install 'keras-gemma[gguf]'."
            ) from error
        try:
            quant_type = GGMLQuantizationType(ggml_type)
            block_size, type_size = GGML_QUANT_SIZES[quant_type]
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"Tensor {name!r} of {self.path} has ggml type {ggml_type}, which "
                "the installed `gguf` package does not know; upgrade it."
            ) from error
        row = int(dims[0])
        if row % block_size:
            raise ValueError(
                f"Tensor {name!r} rows of {row} values do not divide into "
                f"{quant_type.name} blocks of {block_size}."
            )
        row_bytes = row // block_size * type_size
        rows = count // row
        raw = np.frombuffer(self._map, np.uint8, rows * row_bytes, start)
        try:
            values = _dequantize(raw.reshape(rows, row_bytes), quant_type)
        except NotImplementedError as error:
            raise ValueError(
                f"Tensor {name!r} of {self.path} is {quant_type.name}, which "
                "gguf.quants cannot dequantize."
            ) from error
        return np.asarray(values, np.float32).reshape(shape)


# Rows dequantized per numpy call: gguf.quants works on 16 rows at a time,
# which for the 262,144-row embedding table is 16,384 small calls.
_DEQUANTIZE_CHUNK_BYTES = 4 << 20


def _dequantize(raw_rows, quant_type):
    """`gguf.quants.dequantize` of `(rows, row_bytes)` blocks, in large
    chunks spread over the CPU cores (numpy releases the GIL)."""
    import gguf.quants

    quant_class = getattr(gguf.quants, quant_type.name, None)
    if quant_class is None or not hasattr(quant_class, "dequantize_rows"):
        return gguf.quants.dequantize(raw_rows, quant_type)
    if hasattr(quant_class, "init_grid"):
        quant_class.init_grid()
    rows, row_bytes = raw_rows.shape
    step = max(1, _DEQUANTIZE_CHUNK_BYTES // row_bytes)
    first = quant_class.dequantize_rows(raw_rows[:step])
    # Aligned, so that JAX and TensorFlow can keep it (see `assign`).
    out = aligned_empty((rows, first.shape[-1]), np.float32)
    out[: len(first)] = first

    def fill(begin):
        out[begin : begin + step] = quant_class.dequantize_rows(
            raw_rows[begin : begin + step]
        )

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(fill, range(step, rows, step)))
    return out


def _key(metadata, architecture, name, default=None):
    return metadata.get(f"{architecture}.{name}", default)


def _epsilon(value):
    # Stored as float32: 1e-6 reads back as 9.99999997e-07.
    return float(f"{float(value):.7g}")


def backbone_config_from_gguf(gguf_file):
    """`GemmaBackbone` arguments from a GGUF file's metadata and shapes."""
    metadata = gguf_file.metadata
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{gguf_file.path} holds a {architecture!r} model; keras-gemma reads "
            f"GGUF files of {list(ARCHITECTURES)}."
        )

    def key(name, default=None):
        return _key(metadata, architecture, name, default)

    num_layers = int(key("block_count"))
    hidden_dim = int(key("embedding_length"))
    num_query_heads = _per_layer_constant(key("attention.head_count"), "head_count")
    num_key_value_heads = _per_layer_constant(
        key("attention.head_count_kv", num_query_heads), "head_count_kv"
    )
    head_dim = int(key("attention.key_length") or hidden_dim // num_query_heads)
    intermediate_dim = _per_layer_constant(
        key("feed_forward_length"), "feed_forward_length"
    )
    vocabulary_size = gguf_file.shape("token_embd.weight")[0]
    window = key("attention.sliding_window")
    global_base = float(
        key("rope.freq_base", 1_000_000.0 if architecture == "gemma3" else 10_000.0)
    )
    local_base = float(key("rope.freq_base_swa", 10_000.0))
    factor = 1.0
    if key("rope.scaling.type") == "linear":
        factor = float(key("rope.scaling.factor", 1.0))
    # llama.cpp scales the 27B models' queries by hidden/heads, the others
    # by head_dim.
    query_pre_attn_scalar = head_dim
    if (architecture, num_layers) in (("gemma2", 46), ("gemma3", 62)):
        query_pre_attn_scalar = hidden_dim // num_query_heads
    if architecture == "gemma":
        layer_types = ["global"] * num_layers
        rope = (global_base, global_base)
        factors = (factor, factor)
    elif architecture == "gemma2":
        layer_types = [
            "local" if index % 2 == 0 else "global" for index in range(num_layers)
        ]
        rope = (global_base, global_base)
        factors = (factor, factor)
    else:
        pattern = key("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            layer_types = ["local" if flag else "global" for flag in pattern]
        elif int(pattern) == 0:  # llama.cpp: 0 makes every layer local.
            layer_types = ["local"] * num_layers
        else:  # The last layer of every `pattern` is global.
            pattern = int(pattern)
            layer_types = [
                "global" if (index + 1) % pattern == 0 else "local"
                for index in range(num_layers)
            ]
        rope = (global_base, local_base)
        factors = (factor, 1.0)
    return {
        "vocabulary_size": int(vocabulary_size),
        "num_layers": num_layers,
        "num_query_heads": num_query_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_dim": hidden_dim,
        "intermediate_dim": intermediate_dim,
        "head_dim": head_dim,
        "layer_types": layer_types,
        "sliding_window_size": (
            int(window) if window and "local" in layer_types else None
        ),
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "attention_logit_soft_cap": _cap(key("attn_logit_softcapping")),
        "final_logit_soft_cap": _cap(key("final_logit_softcapping")),
        "use_query_key_norm": architecture == "gemma3",
        "use_post_attention_norm": architecture != "gemma",
        "use_post_ffw_norm": architecture != "gemma",
        "rope_max_wavelength": {"global": rope[0], "local": rope[1]},
        "rope_scaling_factor": {"global": factors[0], "local": factors[1]},
        "layer_norm_epsilon": _epsilon(key("attention.layer_norm_rms_epsilon", 1e-6)),
    }


def _cap(value):
    return None if value in (None, 0) else float(value)


def _per_layer_constant(value, name):
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(
                f"The GGUF file varies `{name}` per layer ({value}); Gemma does not."
            )
        value = value[0]
    return int(value)


def transformers_names(architecture, num_layers):
    """transformers tensor name (without `model.`) -> GGUF tensor name."""
    names = {
        "embed_tokens.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
    }
    block_names = dict(_BLOCK_NAMES)
    # Gemma 1 calls its pre-feed-forward norm "post_attention_layernorm".
    block_names["ffn_norm"] = (
        "post_attention_layernorm"
        if architecture == "gemma"
        else "pre_feedforward_layernorm"
    )
    for index in range(num_layers):
        for gguf_name, transformers_name in block_names.items():
            names[f"layers.{index}.{transformers_name}.weight"] = (
                f"blk.{index}.{gguf_name}.weight"
            )
    return names


def load_weights(backbone, gguf_file):
    """Dequantizes the tensors of `gguf_file` into `backbone`, after checking
    every name and shape."""
    from keras_gemma.checkpoints import transformers_format

    architecture = gguf_file.metadata.get("general.architecture")
    names = transformers_names(architecture, backbone.num_layers)
    layout = transformers_format.weight_layout(backbone, prefix="")
    used = set()
    for variable, key, transform in layout:
        gguf_name = names.get(key)
        if gguf_name is None or gguf_name not in gguf_file:
            raise ValueError(
                f"{gguf_file.path} has no tensor {gguf_name or key!r}, which the "
                "configuration needs."
            )
        expected = transformers_format.transformers_shape(variable, transform)
        if gguf_file.shape(gguf_name) != expected:
            raise ValueError(
                f"Tensor {gguf_name!r} in {gguf_file.path} has shape "
                f"{gguf_file.shape(gguf_name)}; the configuration implies {expected}."
            )
        used.add(gguf_name)
    extra = sorted(set(gguf_file.tensor_names()) - used)
    if extra:
        raise ValueError(
            f"{gguf_file.path} holds tensors keras-gemma's Gemma does not use: "
            f"{extra[:5]} (an untied output projection or another architecture)."
        )
    for variable, key, transform in layout:
        gguf_name = names[key]
        tensor = gguf_file.tensor(gguf_name).astype(np.float32, copy=False)
        if gguf_name.endswith("norm.weight"):
            tensor = tensor - 1.0
        value = transformers_format.to_variable_layout(tensor, variable, transform)
        # Dequantized or copied out of the file: the variable may keep it.
        assign(variable, value, owned=True)
        del tensor, value
