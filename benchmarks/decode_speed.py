"""Prefill and decode speed of `GemmaCausalLM` on one backend, in this process.

Kept for its command line; the measuring lives in `keras_gemma.benchmark`
(`keras-gemma bench` runs it in fresh processes and adds cold start, peak
memory and a LoRA step; `benchmarks/compare.py` runs the alternatives side
by side). The backend is Keras's: set `KERAS_BACKEND`. By default the model
is the Gemma 3 270M architecture with random weights; `--preset` loads a
checkpoint instead and `--tiny` runs a very small model.

Usage:

    KERAS_BACKEND=jax python benchmarks/decode_speed.py
    KERAS_BACKEND=torch python benchmarks/decode_speed.py --tiny --threads 1
    KERAS_BACKEND=tensorflow python benchmarks/decode_speed.py \\
        --preset gemma3_270m_q4_k_m --prompt-length 64 --new-tokens 256 \\
        --output results.json
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="checkpoint directory or preset name")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", choices=("int8", "int4"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads for kernels")
    parser.add_argument("--output", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_length < 1 or args.repeats < 1:
        parser.error("need --new-tokens >= 2, --prompt-length >= 1, --repeats >= 1")
    if args.threads:
        # Before the backend starts its thread pools.
        from keras_gemma.benchmark import thread_environment

        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
        os.environ.update(thread_environment(args.threads, backend))
    from keras_gemma import benchmark

    model = args.preset or ("tiny" if args.tiny else "gemma3_270m")
    report = benchmark.measure(
        {
            "model": model,
            "dtype": args.dtype,
            "quantize": args.quantize,
            "batch_size": args.batch_size,
            "prompt_length": args.prompt_length,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "lora": False,
        },
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    report["machine"] = benchmark.machine_info(probe=True)
    report["numpy_probe_gb_per_s"] = report["machine"]["memory_bandwidth_gb_per_s"]
    print(
        f"{report['backend']:>10}  {model}  {args.dtype}  batch "
        f"{args.batch_size}  prompt {args.prompt_length}  new {args.new_tokens}\n"
        f"  prefill  {report['prefill_tokens_per_s']:10.1f} tok/s"
        f"  (first call {report['first_token_s']:.1f} s)\n"
        f"  decode   {report['decode_tokens_per_s']:10.1f} tok/s"
        f"  (first call {report['first_decode_s']:.1f} s)\n"
        f"  numpy probe {report['numpy_probe_gb_per_s']:.1f} GB/s"
    )
    if args.output:
        with open(args.output, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
