"""Runs the user guides in `guides/`, so their code cannot silently rot.

Conventions for the Markdown of a guide:

- A fenced block whose info string is exactly ``python`` is executed. The
  blocks of a guide run in order, in one namespace, in a temporary working
  directory, under the Keras backend pytest runs with. Each guide builds a
  tiny model in its first block, so the whole guide takes seconds.
- A block marked ``python no-run`` is shown to the reader but not executed:
  code for real checkpoints or for a multi-host cluster. It is still
  compiled (its syntax cannot rot), and every built-in preset name it
  passes to `from_preset` must exist.
- A block marked ``text output`` is the expected standard output of the
  executed block just before it, compared line by line (trailing spaces
  ignored). Use it only for output that is the same on every backend.
- Any other block whose info string starts with ``py`` is an error, so a
  typo never turns a runnable example into an unchecked one. Blocks in other
  languages (``bash``, ``text``) are left alone.

The distribution guide needs eight devices: it runs on JAX only (Keras's
distribution API is implemented for JAX alone), in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.

A guide can also be run by hand:
``python tests/test_guides.py guides/lora_finetuning_chat.md``; with
``GUIDE_TIMINGS=1`` set, the time each block takes goes to stderr.
"""

import contextlib
import gc
import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ROOT / "guides"

RUN = "python"
NO_RUN = "python no-run"
OUTPUT = "text output"

_FENCE = re.compile(r"^```(.*)$")
_PRESET_NAME = re.compile(r"from_preset\(\s*[\"']([^\"']+)[\"']")


@dataclass
class Block:
    info: str
    code: str
    line: int  # line number of the first line of code, 1-based


def read_blocks(path):
    """The fenced code blocks of a Markdown file, in order."""
    blocks = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    info = None
    start = 0
    body = []
    for number, line in enumerate(lines, start=1):
        match = _FENCE.match(line)
        if info is None:
            if match:
                info, start, body = match.group(1).strip(), number + 1, []
        elif line.rstrip() == "```":
            blocks.append(Block(info, "\n".join(body) + "\n", start))
            info = None
        else:
            body.append(line)
    if info is not None:
        raise AssertionError(f"{path}:{start - 1}: code block is never closed")
    for block in blocks:
        if block.info.startswith("py") and block.info not in (RUN, NO_RUN):
            raise AssertionError(
                f"{path}:{block.line - 1}: code block marked {block.info!r}; use "
                f"{RUN!r} (executed) or {NO_RUN!r} (shown only)"
            )
    return blocks


def _compile(block, path):
    # Leading newlines make tracebacks point at the guide's own line numbers.
    return compile("\n" * (block.line - 1) + block.code, str(path), "exec")


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy."""

    def __init__(self, stream):
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def isatty(self):
        return False


def _normalize(text):
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def run_guide(path):
    """Executes the runnable blocks of a guide in the current directory."""
    path = Path(path)
    blocks = read_blocks(path)
    runnable = [block for block in blocks if block.info == RUN]
    assert runnable, f"{path} has no {RUN!r} code block"
    shown = [block for block in blocks if block.info == NO_RUN]
    for block in shown:
        _compile(block, path)
    namespace = {"__name__": "__guide__", "__file__": str(path)}
    # Keras runs `gc.collect()` whenever a layer drops a variable (as
    # `quantize` does for every kernel); with PyTorch or TensorFlow loaded,
    # each collection walks hundreds of thousands of objects. Freezing the
    # objects that exist before the guide starts keeps those collections
    # short; it changes nothing else.
    gc.freeze()
    try:
        _run_blocks(path, blocks, namespace)
    finally:
        gc.unfreeze()
    # Checked last: importing keras_gemma imports JAX, and the distribution
    # guide sets XLA_FLAGS in its first block, before JAX is imported.
    from keras_gemma import list_presets

    for block in shown:
        for name in _PRESET_NAME.findall(block.code):
            if "/" in name or "." in name:
                continue  # a path, not a built-in preset
            assert name in list_presets(), (
                f"{path}:{block.line}: unknown preset {name!r}"
            )


def _run_blocks(path, blocks, namespace):
    previous = None
    for block in blocks:
        if block.info == RUN:
            tee = _Tee(sys.stdout)
            start = time.perf_counter()
            with contextlib.redirect_stdout(tee):
                exec(_compile(block, path), namespace)
            if os.environ.get("GUIDE_TIMINGS"):
                seconds = time.perf_counter() - start
                print(f"{path.name}:{block.line}: {seconds:.1f} s", file=sys.stderr)
            previous = (block, tee.copy.getvalue())
        elif block.info == OUTPUT:
            assert previous is not None, (
                f"{path}:{block.line}: an output block must follow a {RUN!r} block"
            )
            source, printed = previous
            assert _normalize(printed) == _normalize(block.code), (
                f"{path}:{block.line}: the block at line {source.line} printed\n"
                f"{printed}\ninstead of the output shown in the guide:\n{block.code}"
            )
            previous = None


def _backend():
    if __name__ == "__main__":
        # Run as a script: the guide's first block sets the backend and
        # XLA_FLAGS, which must happen before keras (and JAX) are imported.
        return None
    import keras

    return keras.backend.backend()


# Guides that need a fresh process with this environment (their first block
# also sets it, for readers who run them as they are).
SUBPROCESS_ENVIRONMENT = {
    "distributed_training.md": {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    },
}
GUIDE_NAMES = [
    "lora_finetuning_chat.md",
    "mixed_precision_and_quantization.md",
    pytest.param(
        "distributed_training.md",
        marks=pytest.mark.skipif(
            _backend() not in ("jax", None),
            reason="Keras's distribution API (DeviceMesh, ModelParallel) is "
            "implemented for the JAX backend only",
        ),
    ),
]


@pytest.mark.parametrize("name", GUIDE_NAMES)
def test_guide(name, tmp_path, monkeypatch):
    if name not in SUBPROCESS_ENVIRONMENT:
        monkeypatch.chdir(tmp_path)
        run_guide(GUIDES / name)
        return
    environment = dict(os.environ, **SUBPROCESS_ENVIRONMENT[name])
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    result = subprocess.run(
        [sys.executable, __file__, str(GUIDES / name)],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{name} failed in a subprocess\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-6000:]}"
    )


def test_every_guide_is_tested():
    names = {getattr(name, "values", [name])[0] for name in GUIDE_NAMES}
    assert {path.name for path in GUIDES.glob("*.md")} == names


def _write_guide(directory, text):
    path = directory / "guide.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_runner_checks_what_guides_show(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fence = "```"
    ok = (
        f"{fence}python\nvalue = 6 * 7\nprint(value)\n{fence}\n\n"
        f"{fence}text output\n42\n{fence}\n\n"
        f"{fence}python no-run\nlm = GemmaCausalLM.from_preset("
        f'"gemma3_instruct_1b")\n{fence}\n\n'
        f"{fence}python\nassert value == 42\n{fence}\n"
    )
    run_guide(_write_guide(tmp_path, ok))

    broken = {
        "printed": ok.replace("\n42\n", "\n41\n"),
        "unknown preset": ok.replace("gemma3_instruct_1b", "gemma9_instruct"),
        "use 'python'": ok.replace(f"{fence}python no-run", f"{fence}py"),
        "never closed": ok + f"{fence}python\nprint(1)\n",
    }
    for message, text in broken.items():
        with pytest.raises(AssertionError, match=re.escape(message)):
            run_guide(_write_guide(tmp_path, text))
    # A failing line of a guide is reported at its line in the Markdown file.
    failing = _write_guide(tmp_path, ok.replace("== 42", "== 41"))
    with pytest.raises(AssertionError) as error:
        run_guide(failing)
    entry = error.traceback[-1]
    assert (Path(entry.path), entry.lineno + 1) == (failing, 15)
    with pytest.raises(SyntaxError):
        run_guide(_write_guide(tmp_path, ok.replace("lm =", "lm = =")))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    run_guide(Path(sys.argv[1]).resolve())
