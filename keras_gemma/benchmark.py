"""Speed and memory of keras-gemma on one backend: `keras-gemma bench`.

For a model (a preset name or path, or a built-in random architecture:
`"gemma3_270m"` or `"tiny"`), backend, dtype, batch size and prompt length,
`measure` reports:

- cold start: seconds from launching a fresh Python process to the first
  generated token, split into interpreter start, imports, loading the model
  and the first token (which includes compiling the prefill);
- prefill and decode tokens/s in the steady state: the compiled prefill
  (prompt forward pass, caches laid out, first token chosen) and the compiled
  decode loop producing the remaining tokens, stopping disabled; medians of
  `repeats` timed runs after a warm-up;
- whether a second prompt length in the same bucket compiles anything new
  (it should not: `new_traces` is 0);
- the bytes of the key/value caches, split into local (sliding-window)
  layers, whose rolling caches stay bounded at long context, and global
  layers;
- the peak resident memory of the process (`ru_maxrss`);
- the time of a LoRA `fit` step (rank 4, random token batches), the median
  after a warm-up step.

`run` measures each configuration in its own fresh process, so cold start
and peak memory are not polluted by earlier work; `format_table` prints the
results. Nothing here imports keras-hub or transformers: side-by-side runs
against them live in the repository's `benchmarks/compare.py`.

Usage:

```
keras-gemma bench                                   # the real 270M preset
keras-gemma bench --model tiny --repeats 2          # a quick smoke test
keras-gemma bench --batch-size 1 4 16 --output bench.json
python -m keras_gemma.benchmark --machine           # describe this machine
```
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

# Built-in random architectures (no download needed).
GEMMA3_270M = {
    "vocabulary_size": 262144,
    "num_layers": 18,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "hidden_dim": 640,
    "intermediate_dim": 2048,
    "head_dim": 256,
    "layer_types": (["local"] * 5 + ["global"]) * 3,
    "sliding_window_size": 512,
    "query_pre_attn_scalar": 256,
    "use_query_key_norm": True,
    "use_post_attention_norm": True,
    "use_post_ffw_norm": True,
    "rope_max_wavelength": {"global": 1e6, "local": 1e4},
}
TINY = {
    "vocabulary_size": 1024,
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 64,
    "intermediate_dim": 128,
    "head_dim": 32,
    "layer_types": ["local", "global"],
    "sliding_window_size": 16,
    "use_query_key_norm": True,
    "use_post_attention_norm": True,
    "use_post_ffw_norm": True,
}
BUILTIN_MODELS = {"gemma3_270m": GEMMA3_270M, "tiny": TINY}

# Settings of one measured configuration (see `measure`).
DEFAULTS = {
    "model": "gemma3_270m_q4_k_m",
    "backend": None,  # the current Keras backend
    "dtype": "float32",
    "quantize": None,  # "int8" or "int4"
    "batch_size": 1,
    "prompt_length": 16,
    "new_tokens": 112,
    "repeats": 3,
    "threads": None,
    "speed": True,  # False: cold start and peak memory only
    "retrace_check": True,
    "lora": True,
    "fit_length": 64,
    "fit_steps": 4,
    "seed": 0,
}

RESULT_MARKER = "KERAS_GEMMA_BENCH_RESULT "
PROGRESS_MARKER = "bench: "
# A fresh interpreter: note the time first, then import (that is timed).
_BOOTSTRAP = (
    "import time; _started = time.time()\n"
    "import json, sys\n"
    "from keras_gemma.benchmark import _child_main\n"
    "_child_main(json.loads(sys.argv[1]), _started)\n"
)


def progress(message):
    """Reports progress from a measuring process to its parent's log."""
    print(PROGRESS_MARKER + message, file=sys.stderr, flush=True)


# -- machine -------------------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The vector extensions that decide which kernels are fast (the same model
# decoded int8 weights at 71 tok/s on JAX on an AVX2 AMD EPYC, 33 on an
# AVX-512 Xeon before XLA's integer product was used there).
_VECTOR_EXTENSIONS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
)


def _cpu_vector_extensions(path="/proc/cpuinfo"):
    """The `_VECTOR_EXTENSIONS` the CPU lists (Linux), in that order."""
    from keras_gemma.layers import storage_layout

    flags = storage_layout.cpu_flags(path)
    return [name for name in _VECTOR_EXTENSIONS if name in flags]


def _total_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _versions():
    from importlib import metadata

    versions = {}
    for name in (
        "keras",
        "jax",
        "jaxlib",
        "tensorflow",
        "torch",
        "numpy",
        "keras-hub",
        "transformers",
        "llama_cpp_python",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def memory_bandwidth_probe(megabytes=256, repeats=5):
    """GB/s read by a numpy matrix-vector product over a float32 table of
    about `megabytes`: how much memory bandwidth the machine had at the time
    (batch-1 decode is bound by it, so it tells a quiet machine from a busy
    one)."""
    columns = 640
    rows = max(1, megabytes * 2**20 // (4 * columns))
    table = np.random.default_rng(0).standard_normal((rows, columns), np.float32)
    vector = np.ones((columns,), np.float32)
    table @ vector
    start = time.perf_counter()
    for _ in range(repeats):
        table @ vector
    seconds = (time.perf_counter() - start) / repeats
    return table.nbytes / seconds / 1e9


def machine_info(probe=False):
    """A dict describing this machine: CPU model and counts, memory, OS,
    Python, package versions, the load average, and with `probe` the
    measured memory bandwidth (`memory_bandwidth_probe`)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    memory = _total_memory_bytes()
    info = {
        "cpu": _cpu_model(),
        "cpu_vector_extensions": _cpu_vector_extensions(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gb": round(memory / 1e9, 1) if memory else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(value, 2) for value in os.getloadavg()]
    if probe:
        info["memory_bandwidth_gb_per_s"] = round(memory_bandwidth_probe(), 1)
    return info


def describe_cpu(info):
    """The CPU model of a `machine_info` dict, with its vector extensions,
    e.g. `AMD EPYC (avx2)`."""
    extensions = info.get("cpu_vector_extensions")
    return info["cpu"] + (f" ({' '.join(extensions)})" if extensions else "")


def describe_machine(info=None):
    """One line for a results file, e.g. `AMD EPYC (avx2), 2 CPUs, 24.6 GB
    memory, Linux-..., Python 3.11.7`."""
    info = info or machine_info()
    cpus = f"{info['usable_cpus']} CPUs"
    if info["usable_cpus"] != info["logical_cpus"]:
        cpus = f"{info['usable_cpus']} of {info['logical_cpus']} CPUs"
    parts = [describe_cpu(info), cpus]
    if info.get("memory_gb"):
        parts.append(f"{info['memory_gb']} GB memory")
    parts += [info["platform"], f"Python {info['python']}"]
    line = ", ".join(parts)
    if "load_average" in info:
        line += f"; load average {info['load_average'][0]}"
    if "memory_bandwidth_gb_per_s" in info:
        line += f"; numpy reads {info['memory_bandwidth_gb_per_s']} GB/s"
    return line


# -- threads -------------------------------------------------------------------


def thread_environment(threads, backend):
    """Environment variables limiting a fresh process's kernel threads."""
    if not threads:
        return {}
    threads = int(threads)
    environment = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": str(threads),
    }
    if backend == "jax":
        environment["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
            + f" intra_op_parallelism_threads={threads}"
        ).strip()
    return environment


def limit_threads(threads):
    """Limits this process's kernel threads where that is still possible
    (PyTorch always; TensorFlow and JAX only before their runtime starts,
    which is why `run` sets `thread_environment` for its processes)."""
    if not threads:
        return
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(int(threads))
    elif backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        except RuntimeError:
            pass  # the runtime started already: the environment decides


# -- the model -----------------------------------------------------------------


def build_causal_lm(model="gemma3_270m", dtype=None, quantize=None):
    """A `GemmaCausalLM`: a built-in random architecture (`"gemma3_270m"`,
    `"tiny"`) or any preset `GemmaCausalLM.from_preset` accepts, then
    optionally `quantize`d (`"int8"`, `"int4"`)."""
    from keras_gemma import GemmaBackbone, GemmaCausalLM

    if model in BUILTIN_MODELS:
        lm = GemmaCausalLM(GemmaBackbone(**BUILTIN_MODELS[model], dtype=dtype))
    else:
        lm = GemmaCausalLM.from_preset(model, dtype=dtype)
    if quantize:
        lm.quantize(quantize)
    return lm


def random_prompts(vocabulary_size, batch_size, prompt_length, seed=0):
    """`(token_ids, padding_mask)`: random full-length prompts starting with
    `<bos>` (id 2), as int32 and bool numpy arrays."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(
        3, vocabulary_size, size=(batch_size, prompt_length), dtype=np.int32
    )
    token_ids[:, 0] = 2
    return token_ids, np.ones(token_ids.shape, bool)


def same_bucket_length(prompt_length):
    """Another prompt length that the decode loop pads to the same width.

    >>> same_bucket_length(16), same_bucket_length(17), same_bucket_length(1)
    (15, 18, 2)
    """
    from keras_gemma.generation.decode_loop import bucket_length

    bucket = bucket_length(prompt_length)
    for other in (prompt_length - 1, prompt_length + 1):
        if other >= 1 and bucket_length(other) == bucket:
            return other
    raise ValueError(f"No other prompt length shares {prompt_length}'s bucket.")


class EngineCalls:
    """Prefill and decode of keras-gemma's compiled decode loop, callable
    separately so that each can be timed.

    Made by `engine_calls`. `prefill()` runs the compiled prefill (the
    prompt forward pass, caches laid out, the first token chosen) and
    returns the loop state, with the first tokens copied to the host.
    `decode(state)` runs the compiled loop for the remaining tokens with
    stopping disabled and returns the generated ids on the host; it consumes
    `state` (JAX donates it), so give it a fresh one each time.
    `cache_bytes(state)` is the bytes of each layer's key/value cache.
    """

    def __init__(self, prefill, decode, cache_bytes, trace_count):
        self.prefill = prefill
        self.decode = decode
        self.cache_bytes = cache_bytes
        self._trace_count = trace_count

    @property
    def trace_count(self):
        """Programs traced (JAX, TensorFlow) or steps recorded (PyTorch) so
        far by the model's decode engine."""
        return self._trace_count()


def engine_calls(lm, token_ids, padding_mask, new_tokens, sampler="greedy", seed=0):
    """`EngineCalls` for `lm` on right-padded prompts, `new_tokens` each.

    The one place that reaches into `DecodeEngine`'s internals (the
    host-side preparation and the compiled "start" and "advance"
    functions that `DecodeEngine.stream` uses): adapt it if they change.
    """
    from keras import ops

    from keras_gemma.generation import samplers

    engine = lm.decode_engine
    sampler = samplers.get(sampler)
    inputs, _, _ = engine._prepare(token_ids, padding_mask, new_tokens, (), seed=seed)
    tensors = engine._to_tensors(inputs)
    start = engine._function("start", sampler)
    advance = engine._function("advance", sampler)

    def prefill():
        state = start(tensors)
        np.asarray(ops.convert_to_numpy(state["tokens"]))
        return state

    def decode(state):
        return np.asarray(ops.convert_to_numpy(advance(state, tensors)["generated"]))

    def cache_bytes(state):
        return [
            sum(_tensor_bytes(tensor) for tensor in cache) for cache in state["caches"]
        ]

    return EngineCalls(prefill, decode, cache_bytes, lambda: engine.trace_count)


def _tensor_bytes(tensor):
    import keras

    name = keras.backend.standardize_dtype(tensor.dtype)
    try:
        itemsize = np.dtype(name).itemsize
    except TypeError:
        import ml_dtypes

        itemsize = np.dtype(getattr(ml_dtypes, name)).itemsize
    return int(np.prod(tuple(tensor.shape))) * itemsize


# -- memory --------------------------------------------------------------------


def peak_rss_mb():
    """This process's peak resident memory so far, in MiB (`ru_maxrss`)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Kilobytes on Linux, bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mb():
    """This process's resident memory now, in MiB (Linux; else `None`)."""
    try:
        with open("/proc/self/statm") as file:
            pages = int(file.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


# -- measurements --------------------------------------------------------------


def measure_speed(lm, batch_size=1, prompt_length=16, new_tokens=112, repeats=3):
    """Prefill and decode speed of `lm`'s compiled decode loop.

    Runs once untimed (compilation), then `repeats` timed prefills and
    decodes with stopping disabled; reports medians. Prefill covers the
    prompt's forward pass and the first new token; decode the other
    `new_tokens - 1` tokens per row.

    Returns:
        A dict: `prefill_tokens_per_s`, `decode_tokens_per_s`,
        `prefill_s`, `decode_s` (medians), `prefill_times_s`,
        `decode_times_s`, `first_prefill_s`, `first_decode_s` (the
        compiling calls), the key/value cache bytes (`kv_cache_bytes`,
        `kv_cache_local_bytes`, `kv_cache_global_bytes`) and `trace_count`.
    """
    if new_tokens < 2 or prompt_length < 1 or repeats < 1 or batch_size < 1:
        raise ValueError(
            "Need new_tokens >= 2 and prompt_length, repeats, batch_size >= 1."
        )
    token_ids, padding_mask = random_prompts(
        lm.backbone.vocabulary_size, batch_size, prompt_length
    )
    calls = engine_calls(lm, token_ids, padding_mask, new_tokens)
    begin = time.perf_counter()
    state = calls.prefill()
    first_prefill_s = time.perf_counter() - begin
    per_layer = calls.cache_bytes(state)
    begin = time.perf_counter()
    calls.decode(state)
    first_decode_s = time.perf_counter() - begin

    prefill_times, decode_times = [], []
    for _ in range(repeats):
        begin = time.perf_counter()
        state = calls.prefill()
        middle = time.perf_counter()
        calls.decode(state)
        end = time.perf_counter()
        prefill_times.append(middle - begin)
        decode_times.append(end - middle)
    prefill_s = statistics.median(prefill_times)
    decode_s = statistics.median(decode_times)
    return {
        "prefill_tokens_per_s": batch_size * prompt_length / prefill_s,
        "decode_tokens_per_s": batch_size * (new_tokens - 1) / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_times_s": prefill_times,
        "decode_times_s": decode_times,
        "first_prefill_s": first_prefill_s,
        "first_decode_s": first_decode_s,
        **_cache_summary(per_layer, lm.backbone.layer_types),
        "trace_count": calls.trace_count,
    }


def _cache_summary(per_layer, layer_types):
    local = sum(size for size, kind in zip(per_layer, layer_types) if kind == "local")
    return {
        "kv_cache_bytes": sum(per_layer),
        "kv_cache_local_bytes": local,
        "kv_cache_global_bytes": sum(per_layer) - local,
    }


def measure_kv_cache(lm, batch_size=1, prompt_length=16, new_tokens=112):
    """Bytes of the key/value caches the decode loop holds for such a
    generation (from one prefill): `kv_cache_bytes`, and of those
    `kv_cache_local_bytes` (sliding-window layers: rolling caches bounded by
    the window) and `kv_cache_global_bytes` (growing with the context)."""
    token_ids, padding_mask = random_prompts(
        lm.backbone.vocabulary_size, batch_size, prompt_length
    )
    calls = engine_calls(lm, token_ids, padding_mask, new_tokens)
    return _cache_summary(calls.cache_bytes(calls.prefill()), lm.backbone.layer_types)


def check_no_retrace(lm, batch_size=1, prompt_length=16, new_tokens=112):
    """Generates for a second prompt length in the same bucket as
    `prompt_length` (after `measure_speed` compiled that bucket) and counts
    the programs traced meanwhile.

    Returns:
        A dict: `second_prompt_length`, `new_traces` (0 when nothing was
        recompiled) and `second_prompt_s` (its prefill plus decode time).
    """
    other = same_bucket_length(prompt_length)
    token_ids, padding_mask = random_prompts(
        lm.backbone.vocabulary_size, batch_size, other, seed=1
    )
    calls = engine_calls(lm, token_ids, padding_mask, new_tokens)
    before = calls.trace_count
    begin = time.perf_counter()
    calls.decode(calls.prefill())
    seconds = time.perf_counter() - begin
    return {
        "second_prompt_length": other,
        "new_traces": calls.trace_count - before,
        "second_prompt_s": seconds,
    }


def measure_lora_fit(lm, batch_size=1, sequence_length=64, steps=4, rank=4, seed=0):
    """Time of LoRA training steps: enables rank-`rank` adapters on `lm`
    (so do this last) and runs `fit` for `steps` batches of random tokens.

    Returns:
        A dict: `lora_fit_step_s` (the median step after the first),
        `lora_first_step_s` (compilation included), `lora_step_times_s`
        and `lora_trainable_params`.
    """
    import keras

    if steps < 2:
        raise ValueError("Need at least 2 fit steps (one warm-up).")

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            # Not async-safe: Keras hands over the logs as Python numbers,
            # so the step has finished when this runs.
            self.ends.append(time.perf_counter())

    lm.backbone.enable_lora(rank=rank)
    vocabulary = lm.backbone.vocabulary_size
    rng = np.random.default_rng(seed)
    tokens = rng.integers(
        3, vocabulary, size=(steps * batch_size, sequence_length + 1), dtype=np.int32
    )
    tokens[:, 0] = 2
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((steps * batch_size, sequence_length), bool),
    }
    timer = StepTimer()
    lm.fit(
        x,
        tokens[:, 1:],
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer],
    )
    times = list(np.diff(timer.ends))
    return {
        "lora_fit_step_s": statistics.median(times[1:]),
        "lora_first_step_s": times[0],
        "lora_step_times_s": times,
        "lora_trainable_params": int(
            sum(np.prod(tuple(v.shape)) for v in lm.trainable_weights)
        ),
    }


def measure(spec=None, log=None, spawned=None, started=None, imported=None):
    """Measures one configuration in this process (see the module docstring).

    Args:
        spec: settings overriding `DEFAULTS` (model, dtype, quantize,
            batch_size, prompt_length, new_tokens, repeats, threads, speed,
            retrace_check, lora, fit_length, fit_steps).
        log: a function given short progress messages; default none.
        spawned, started, imported: `time.time()` when this process was
            launched, when its interpreter started and when its imports
            finished; with them the cold start is counted from the launch,
            without them from this call.

    Returns:
        A dict of settings and results: `load_s`, `first_token_s`,
        `cold_start_s` (and with the times above `interpreter_s`,
        `import_s`), the entries of `measure_speed`, `check_no_retrace` and
        `measure_lora_fit`, `peak_rss_mb` (before LoRA) and
        `lora_peak_rss_mb`, `parameters`.
    """
    import keras

    spec = {**DEFAULTS, **(spec or {})}
    log = log or (lambda message: None)
    backend = keras.backend.backend()
    limit_threads(spec["threads"])
    batch, length, new = spec["batch_size"], spec["prompt_length"], spec["new_tokens"]
    label = (
        f"{backend} {spec['model']} {spec['dtype']}"
        f"{' ' + spec['quantize'] if spec['quantize'] else ''} batch {batch} "
        f"prompt {length}"
    )
    called = time.time()
    result = {key: spec[key] for key in DEFAULTS}
    result["backend"] = backend
    result["keras_version"] = keras.__version__
    if spawned is not None:
        result["interpreter_s"] = started - spawned
        result["import_s"] = imported - started

    log(f"{label}: loading")
    begin = time.perf_counter()
    lm = build_causal_lm(spec["model"], dtype=spec["dtype"], quantize=spec["quantize"])
    result["load_s"] = time.perf_counter() - begin
    result["parameters"] = int(lm.backbone.count_params())
    result["rss_after_load_mb"] = current_rss_mb()

    # The first token of a fresh process: what `stream` shows first.
    token_ids, padding_mask = random_prompts(lm.backbone.vocabulary_size, batch, length)
    calls = engine_calls(lm, token_ids, padding_mask, new)
    begin = time.perf_counter()
    calls.prefill()
    result["first_token_s"] = time.perf_counter() - begin
    result["cold_start_s"] = time.time() - (spawned if spawned is not None else called)
    log(f"{label}: first token after {result['cold_start_s']:.1f} s; timing")

    if spec["speed"]:
        result.update(measure_speed(lm, batch, length, new, repeats=spec["repeats"]))
        log(
            f"{label}: prefill {result['prefill_tokens_per_s']:.1f} tok/s, "
            f"decode {result['decode_tokens_per_s']:.1f} tok/s"
        )
        if spec["retrace_check"]:
            result.update(check_no_retrace(lm, batch, length, new))
    result["peak_rss_mb"] = peak_rss_mb()
    if spec["lora"]:
        log(f"{label}: LoRA fit")
        try:
            result.update(
                measure_lora_fit(
                    lm,
                    batch_size=batch,
                    sequence_length=spec["fit_length"],
                    steps=spec["fit_steps"],
                    seed=spec["seed"],
                )
            )
            result["lora_peak_rss_mb"] = peak_rss_mb()
        except Exception as error:  # reported, so the other numbers survive
            result["lora_error"] = f"{type(error).__name__}: {error}"
    return result


def _child_main(spec, started):
    """Entry point of a fresh measuring process (see `run`)."""
    imported = time.time()
    try:
        result = measure(
            spec,
            log=progress,
            spawned=spec.get("spawned_at"),
            started=started,
            imported=imported,
        )
    except Exception as error:
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    sys.exit(1 if "error" in result else 0)


def _package_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_environment(backend=None, threads=None):
    """Environment of a fresh measuring process: this one's, with the Keras
    backend, quiet TensorFlow logs, thread limits and this keras_gemma
    importable."""
    environment = dict(os.environ)
    if backend:
        environment["KERAS_BACKEND"] = backend
    backend = environment.get("KERAS_BACKEND", "tensorflow")
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    environment.update(thread_environment(threads, backend))
    paths = [_package_root()] + [
        path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path
    ]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def run_python(code, argv=(), environment=None, log=None, timeout=None):
    """Runs `python -c code *argv` in a fresh process and returns the JSON
    object it prints after `RESULT_MARKER`.

    Lines the child writes to stderr through `progress` are passed to
    `log`; the rest is kept and shown if the child fails (the last lines
    are in the result's `stderr_tail` when it reports an error).
    """
    log = log or (lambda message: None)
    process = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        text=True,
    )
    tail = []

    def read_errors():
        for line in process.stderr:
            if PROGRESS_MARKER in line:
                log(line.split(PROGRESS_MARKER, 1)[1].rstrip())
            else:
                tail.append(line)
                del tail[:-40]

    reader = threading.Thread(target=read_errors, daemon=True)
    reader.start()
    timer = threading.Timer(timeout, process.kill) if timeout else None
    if timer:
        timer.start()
    output = process.stdout.read()  # stderr is the reader's alone
    process.wait()
    reader.join()
    if timer:
        timer.cancel()
    result = None
    for line in output.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER) :])
    if result is None:
        raise RuntimeError(
            f"The measuring process exited with status {process.returncode} "
            "without a result:\n" + "".join(tail[-20:])
        )
    if "error" in result:
        result["stderr_tail"] = "".join(tail[-20:])
    return result


def measure_in_fresh_process(spec, backend=None, log=None, timeout=None):
    """`measure(spec)` in a fresh Python process on `backend` (default: the
    `KERAS_BACKEND` of this one), so the cold start includes the imports
    and the peak memory is that configuration's alone."""
    spec = {**DEFAULTS, **spec}
    spec["spawned_at"] = time.time()
    environment = child_environment(backend or spec["backend"], spec["threads"])
    return run_python(
        _BOOTSTRAP, [json.dumps(spec)], environment, log=log, timeout=timeout
    )


def run(
    model=DEFAULTS["model"],
    backends=(None,),
    dtype="float32",
    quantize=None,
    batch_sizes=(1,),
    prompt_lengths=(16,),
    new_tokens=112,
    repeats=3,
    threads=None,
    lora=True,
    retrace_check=True,
    fit_length=64,
    fit_steps=4,
    in_process=False,
    log=None,
    timeout=None,
):
    """Measures every combination of backend, batch size and prompt length,
    each in a fresh process (or all in this one with `in_process`, where
    the cold start starts at the call and peak memory accumulates).

    Returns:
        `{"machine": machine_info(), "command": ..., "results": [...]}`,
        one `measure` dict per configuration (with `error` if it failed).
    """
    report = {"machine": machine_info(), "command": " ".join(sys.argv), "results": []}
    for backend in backends:
        for batch_size in batch_sizes:
            for prompt_length in prompt_lengths:
                spec = {
                    "model": model,
                    "backend": backend,
                    "dtype": dtype,
                    "quantize": quantize,
                    "batch_size": batch_size,
                    "prompt_length": prompt_length,
                    "new_tokens": new_tokens,
                    "repeats": repeats,
                    "threads": threads,
                    "lora": lora,
                    "retrace_check": retrace_check,
                    "fit_length": fit_length,
                    "fit_steps": fit_steps,
                }
                if in_process:
                    import keras

                    if backend and backend != keras.backend.backend():
                        raise ValueError(
                            f"In-process runs use this process's backend "
                            f"({keras.backend.backend()}), not {backend!r}."
                        )
                    result = measure(spec, log=log)
                else:
                    result = measure_in_fresh_process(
                        spec, backend=backend, log=log, timeout=timeout
                    )
                    if "error" in result:  # say which configuration failed
                        result = {**spec, "backend": backend, **result}
                report["results"].append(result)
    return report


# -- output --------------------------------------------------------------------

TABLE_COLUMNS = (
    ("backend", "backend", "{}"),
    ("model", "model", "{}"),
    ("dtype", "dtype", "{}"),
    ("batch", "batch_size", "{}"),
    ("prompt", "prompt_length", "{}"),
    ("prefill tok/s", "prefill_tokens_per_s", "{:.1f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("cold start s", "cold_start_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mb", "{:.0f}"),
    ("KV cache MiB", "kv_cache_mib", "{:.1f}"),
    ("LoRA step s", "lora_fit_step_s", "{:.2f}"),
    ("new traces", "new_traces", "{}"),
)


def _cell(result, key, template):
    if key == "dtype" and result.get("quantize"):
        return f"{result['dtype']}+{result['quantize']}"
    if key == "kv_cache_mib" and "kv_cache_bytes" in result:
        return template.format(result["kv_cache_bytes"] / 2**20)
    value = result.get(key)
    if value is None:
        return "error" if key == "decode_tokens_per_s" and "error" in result else "-"
    return template.format(value)


def format_table(results, columns=TABLE_COLUMNS, markdown=False):
    """The results as a plain-text (or Markdown) table, one row each."""
    header = [title for title, _, _ in columns]
    rows = [[_cell(result, key, fmt) for _, key, fmt in columns] for result in results]
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, *rows]
    )


def _main(argv=None):
    """`python -m keras_gemma.benchmark`: `--machine` describes this
    machine; anything else is `keras-gemma bench`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--machine"]:
        info = machine_info(probe="--probe" in argv)
        print(describe_machine(info))
        print(json.dumps(info, indent=2))
        return 0
    from keras_gemma.cli import main

    return main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(_main())
