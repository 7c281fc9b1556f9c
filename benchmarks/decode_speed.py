"""Prefill and decode speed of `GemmaCausalLM` generation on one backend.

The backend is Keras's: set `KERAS_BACKEND` (jax, tensorflow or torch).
By default the model is the Gemma 3 270M architecture with random weights
(no download needed); `--preset` loads a checkpoint instead, and `--tiny`
runs a very small model for a quick smoke test.

Each measurement first runs once untimed (compilation and warm-up), then
`--repeats` timed runs; the median is reported. Prefill is the compiled
first step (prompt forward pass, caches laid out, first token sampled);
decode is the compiled loop producing the remaining tokens, with stopping
disabled so every run produces the same number of tokens.

`--threads` limits the CPU threads of the backend's kernels. On a small
shared machine PyTorch's thread pool can be many times slower with two
threads than with one when other work competes for the cores, so compare
backends with the same setting. A numpy matrix-vector product over an
embedding-sized table is timed too (`numpy_probe_gb_per_s`), to show how
much memory bandwidth the machine had during the run.

Usage:

    KERAS_BACKEND=jax python benchmarks/decode_speed.py
    KERAS_BACKEND=torch python benchmarks/decode_speed.py --tiny --threads 1
    KERAS_BACKEND=tensorflow python benchmarks/decode_speed.py \\
        --preset ./gemma3_270m --prompt-length 64 --new-tokens 256 \\
        --output results.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def limit_threads(threads):
    """Limits kernel threads; must run before the backend is imported."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
            + f" intra_op_parallelism_threads={threads}"
        )
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def numpy_probe(rows=262144, columns=640, repeats=5):
    """GB/s of a numpy matrix-vector product over a (rows, columns) float32
    table: the memory bandwidth available during the run."""
    table = np.random.default_rng(0).standard_normal((rows, columns), np.float32)
    vector = np.ones((columns,), np.float32)
    table @ vector
    start = time.perf_counter()
    for _ in range(repeats):
        table @ vector
    seconds = (time.perf_counter() - start) / repeats
    return table.nbytes / seconds / 1e9


def build_model(args):
    from keras_gemma import GemmaBackbone, GemmaCausalLM

    if args.preset:
        return GemmaCausalLM.from_preset(args.preset, dtype=args.dtype), args.preset
    config = TINY if args.tiny else GEMMA3_270M
    backbone = GemmaBackbone(**config, dtype=args.dtype)
    return GemmaCausalLM(backbone), "tiny" if args.tiny else "gemma3_270m (random)"


def _median_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(lm, args):
    import keras

    from keras_gemma.generation import samplers

    engine = lm.decode_engine
    sampler = samplers.get(args.sampler)
    vocabulary = lm.backbone.vocabulary_size
    rng = np.random.default_rng(0)
    token_ids = rng.integers(3, vocabulary, size=(args.batch_size, args.prompt_length))
    token_ids[:, 0] = 2
    padding_mask = np.ones_like(token_ids, dtype=bool)
    budget = args.new_tokens

    inputs, _, _ = engine._prepare(token_ids, padding_mask, budget, (), seed=0)
    tensors = engine._to_tensors(inputs)
    start = engine._function("start", sampler)
    advance = engine._function("advance", sampler)

    def to_host(state):
        return keras.ops.convert_to_numpy(state["generated"])

    def prefill():
        return to_host(start(tensors))

    def decode():
        # `advance` donates its state on JAX: give it a fresh one each time.
        state = start(tensors)
        keras.ops.convert_to_numpy(state["step"])
        begin = time.perf_counter()
        to_host(advance(state, tensors))
        return time.perf_counter() - begin

    def generate():
        engine.generate(token_ids, padding_mask, budget, (), sampler, seed=0)

    timings = {}
    begin = time.perf_counter()
    prefill()
    timings["first_prefill_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    decode()
    timings["first_decode_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    generate()
    timings["first_generate_s"] = time.perf_counter() - begin

    prefill_s, _ = _median_seconds(prefill, args.repeats)
    decode_times = [decode() for _ in range(args.repeats)]
    decode_s = statistics.median(decode_times)
    generate_s, _ = _median_seconds(generate, args.repeats)
    decoded_tokens = args.batch_size * (budget - 1)
    return {
        "prefill_tokens_per_s": args.batch_size * args.prompt_length / prefill_s,
        "decode_tokens_per_s": decoded_tokens / decode_s,
        "generate_tokens_per_s": args.batch_size * budget / generate_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "generate_s": generate_s,
        **timings,
        "trace_count": engine.trace_count,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="checkpoint directory or preset name")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=112)
    parser.add_argument("--sampler", default="greedy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads for kernels")
    parser.add_argument("--output", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_length < 1 or args.repeats < 1:
        parser.error("need --new-tokens >= 2, --prompt-length >= 1, --repeats >= 1")
    if args.threads is not None:
        limit_threads(args.threads)
    import keras

    build_start = time.perf_counter()
    lm, model_name = build_model(args)
    build_s = time.perf_counter() - build_start
    results = measure(lm, args)
    probe = numpy_probe()
    report = {
        "backend": keras.backend.backend(),
        "model": model_name,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "sampler": args.sampler,
        "repeats": args.repeats,
        "build_s": build_s,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads,
        "numpy_probe_gb_per_s": probe,
        **results,
    }
    print(
        f"{report['backend']:>10}  {model_name}  {args.dtype}  batch "
        f"{args.batch_size}  prompt {args.prompt_length}  new {args.new_tokens}\n"
        f"  prefill  {results['prefill_tokens_per_s']:10.1f} tok/s"
        f"  (first call {results['first_prefill_s']:.1f} s)\n"
        f"  decode   {results['decode_tokens_per_s']:10.1f} tok/s"
        f"  (first call {results['first_decode_s']:.1f} s)\n"
        f"  generate {results['generate_tokens_per_s']:10.1f} tok/s end to end\n"
        f"  numpy probe {probe:.1f} GB/s"
    )
    if args.output:
        with open(args.output, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
