"""The `keras-gemma` command: generate text, list presets, convert checkpoints,
benchmark.

Examples:

```
keras-gemma generate "The capital of France is"            # offline default
keras-gemma generate --preset gemma2_instruct_2b_en --chat "Write a haiku"
keras-gemma generate --stream --max-new-tokens 64 "Once upon a time"
keras-gemma presets
keras-gemma convert hf://google/gemma-2-2b ./gemma2_2b            # our format
keras-gemma convert ./gemma2_2b ./gemma2_2b_hf --to transformers
keras-gemma bench --batch-size 1 4 --output bench.json   # speed and memory
```

`rich` (optional) draws the preset table and a spinner while loading.
"""

import argparse
import contextlib
import json
import sys

from keras_gemma.checkpoints.preset_registry import DEFAULT_PRESET

FORMATS = ("keras-gemma", "transformers")


def _rich_console(stream):
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=stream)


@contextlib.contextmanager
def _status(message, stream):
    """A spinner on a terminal (with rich), else one line on `stream`."""
    console = _rich_console(stream) if stream.isatty() else None
    if console is not None:
        with console.status(message):
            yield
    else:
        print(message, file=stream, flush=True)
        yield


def _human_count(count):
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= factor:
            return f"{count / factor:.2f}{suffix}"
    return str(count)


# -- presets --------------------------------------------------------------


def _presets_command(args, out):
    from keras_gemma.checkpoints import preset_registry

    presets = [
        preset_registry.get_preset(name) for name in preset_registry.list_presets()
    ]
    if args.family:
        presets = [preset for preset in presets if preset["family"] == args.family]
    if args.json:
        json.dump(
            [
                {
                    key: preset[key]
                    for key in ("name", "family", "params", "instruction_tuned")
                }
                | {"sources": preset["sources"], "description": preset["description"]}
                for preset in presets
            ],
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    rows = [
        (
            preset["name"],
            preset["family"],
            _human_count(preset["params"]),
            "yes" if preset.get("instruction_tuned") else "",
            preset["sources"][0],
        )
        for preset in presets
    ]
    header = ("preset", "family", "params", "instruct", "weights from")
    console = _rich_console(out) if out.isatty() else None
    if console is not None:
        from rich.table import Table

        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return 0
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        out.write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
        out.write("\n")
    return 0


# -- generate -------------------------------------------------------------


def _generate_command(args, out):
    from keras_gemma.checkpoints.preset_loading import load_causal_lm

    prompt = " ".join(args.prompt)
    with _status(f"Loading {args.preset} ...", sys.stderr):
        lm = load_causal_lm(args.preset, dtype=args.dtype)
    if lm.preprocessor is None:
        raise SystemExit(
            f"error: preset {args.preset!r} has no tokenizer, so it cannot generate "
            "text; use a preset that includes one."
        )
    text = prompt
    if args.chat:
        from keras_gemma.chat import render_chat

        # The preprocessor adds <bos> itself.
        text = render_chat(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            add_bos=False,
        )
    options = {"max_new_tokens": args.max_new_tokens}
    if args.sampler:
        options["sampler"] = args.sampler
    if args.seed is not None:
        options["seed"] = args.seed
    if args.stream and hasattr(lm, "stream"):
        if not args.chat:
            out.write(prompt)
        for piece in lm.stream(text, **options):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    if args.chat:
        result = lm.generate(text, strip_prompt=True, **options)
    else:
        result = lm.generate(text, **options)
    out.write(result + "\n")
    return 0


# -- convert --------------------------------------------------------------


def _convert_command(args, out):
    from keras_gemma.checkpoints import preset_loading

    with _status(f"Loading {args.source} ...", sys.stderr):
        lm = preset_loading.load_causal_lm(args.source, dtype=args.dtype)
    with _status(f"Writing {args.destination} ...", sys.stderr):
        if args.to == "transformers":
            preset_loading.export_to_transformers(
                lm, args.destination, max_shard_size=args.max_shard_size
            )
        else:
            preset_loading.save_to_preset(
                lm, args.destination, max_shard_size=args.max_shard_size
            )
    out.write(
        f"Wrote {args.destination} ({args.to} format, "
        f"{_human_count(lm.backbone.count_params())} parameters).\n"
    )
    return 0


# -- bench ----------------------------------------------------------------


def _bench_command(args, out):
    from keras_gemma import benchmark

    numbers = {
        "--batch-size": min(args.batch_size),
        "--prompt-length": min(args.prompt_length),
        "--repeats": args.repeats,
        "--threads": args.threads or 1,
        "--fit-length": args.fit_length,
    }
    for flag, value in numbers.items():
        if value < 1:
            raise ValueError(f"{flag} must be positive")
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (one prefill, one decode)")
    if args.fit_steps < 2:
        raise ValueError("--fit-steps must be at least 2 (one is a warm-up)")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    report = benchmark.run(
        model=args.model,
        backends=args.backend or [None],
        dtype=args.dtype,
        quantize=args.quantize,
        batch_sizes=args.batch_size,
        prompt_lengths=args.prompt_length,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        lora=not args.no_lora,
        retrace_check=not args.no_retrace_check,
        fit_length=args.fit_length,
        fit_steps=args.fit_steps,
        in_process=args.in_process,
        log=log,
    )
    out.write(benchmark.format_table(report["results"]) + "\n")
    out.write(benchmark.describe_machine(report["machine"]) + "\n")
    for result in report["results"]:
        if "error" in result:
            out.write(
                f"error ({result.get('backend')}, batch {result.get('batch_size')}, "
                f"prompt {result.get('prompt_length')}): {result['error']}\n"
            )
        elif "lora_error" in result:
            out.write(f"LoRA fit failed: {result['lora_error']}\n")
    if args.output:
        with open(args.output, "w") as file:
            json.dump(report, file, indent=2)
            file.write("\n")
        out.write(f"Wrote {args.output}.\n")
    return 1 if any("error" in result for result in report["results"]) else 0


def build_parser():
    """The argument parser of `keras-gemma` (subcommands can be added to it).

    Example:

    >>> args = build_parser().parse_args(["generate", "--max-new-tokens", "8", "Hi"])
    >>> args.preset, args.max_new_tokens, args.prompt
    ('gemma3_270m_q4_k_m', 8, ['Hi'])
    """
    parser = argparse.ArgumentParser(
        prog="keras-gemma",
        description="Gemma language models in Keras 3 (JAX, PyTorch, TensorFlow).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    generate = commands.add_parser("generate", help="generate text from a prompt")
    generate.add_argument("prompt", nargs="+", help="the prompt text")
    generate.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=(
            "preset name, local checkpoint, .gguf file, hf://... or kaggle://... "
            f"(default: {DEFAULT_PRESET}, which needs no network)"
        ),
    )
    generate.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate (64)"
    )
    generate.add_argument(
        "--stream", action="store_true", help="print tokens as they come"
    )
    generate.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in Gemma's chat turn format (instruction-tuned models)",
    )
    generate.add_argument(
        "--sampler", help="sampler name, e.g. greedy, top_k, top_p (default greedy)"
    )
    generate.add_argument("--seed", type=int, help="seed for random samplers")
    generate.add_argument("--dtype", help="e.g. float32 or bfloat16")
    generate.set_defaults(handler=_generate_command)

    presets = commands.add_parser("presets", help="list the built-in presets")
    presets.add_argument("--family", help="only this family (gemma, gemma2, gemma3)")
    presets.add_argument("--json", action="store_true", help="print JSON")
    presets.set_defaults(handler=_presets_command)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint to keras-gemma or transformers format"
    )
    convert.add_argument("source", help="any preset: name, directory, .gguf, hf://...")
    convert.add_argument("destination", help="directory to write")
    convert.add_argument("--to", choices=FORMATS, default="keras-gemma")
    convert.add_argument("--dtype", help="weight dtype, e.g. bfloat16")
    convert.add_argument(
        "--max-shard-size", default="5GB", help="largest weight file (5GB)"
    )
    convert.set_defaults(handler=_convert_command)

    bench = commands.add_parser(
        "bench",
        help="measure cold start, prefill and decode speed, memory, a LoRA step",
        description=(
            "Measures keras-gemma on this machine, one fresh process per "
            "configuration: cold start to the first token, prefill and decode "
            "tokens/s (stopping disabled), peak resident memory, key/value "
            "cache bytes, that a new prompt length in the same bucket does "
            "not recompile, and a LoRA fit step. Prints a table; --output "
            "writes JSON."
        ),
    )
    bench.add_argument(
        "--model",
        "--preset",
        dest="model",
        default=DEFAULT_PRESET,
        help=(
            "preset name or path, or a random architecture: gemma3_270m or tiny "
            f"(default: {DEFAULT_PRESET})"
        ),
    )
    bench.add_argument(
        "--backend",
        nargs="+",
        choices=("jax", "tensorflow", "torch"),
        help="Keras backends to measure (default: KERAS_BACKEND)",
    )
    bench.add_argument("--dtype", default="float32", help="e.g. bfloat16 (float32)")
    bench.add_argument(
        "--quantize", choices=("int8", "int4"), help="quantize the weights first"
    )
    bench.add_argument(
        "--batch-size", type=int, nargs="+", default=[1], help="one or more (1)"
    )
    bench.add_argument(
        "--prompt-length", type=int, nargs="+", default=[16], help="one or more (16)"
    )
    bench.add_argument(
        "--new-tokens", type=int, default=112, help="tokens generated per row (112)"
    )
    bench.add_argument("--repeats", type=int, default=3, help="timed runs (3)")
    bench.add_argument("--threads", type=int, help="CPU threads for the kernels")
    bench.add_argument("--no-lora", action="store_true", help="skip the LoRA step")
    bench.add_argument(
        "--no-retrace-check",
        action="store_true",
        help="skip checking that a second prompt length compiles nothing new",
    )
    bench.add_argument(
        "--fit-length", type=int, default=64, help="LoRA training sequence length"
    )
    bench.add_argument(
        "--fit-steps", type=int, default=4, help="LoRA fit steps, one warm-up (4)"
    )
    bench.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process (no import time; peak memory accumulates)",
    )
    bench.add_argument("--output", help="write the results to this JSON file")
    bench.set_defaults(handler=_bench_command)
    return parser


def main(argv=None, out=None):
    """Runs the `keras-gemma` command with `argv` (default `sys.argv[1:]`).

    Returns the exit status. Errors in the arguments or the preset print a
    one-line message to stderr and return 2 or 1.

    Example:

    ```
    main(["presets"])
    main(["generate", "--max-new-tokens", "20", "The capital of France is"])
    ```
    """
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if (
        getattr(args, "max_new_tokens", 1) is not None
        and getattr(args, "max_new_tokens", 1) <= 0
    ):
        parser.error("--max-new-tokens must be positive")
    try:
        return args.handler(args, out)
    except (ValueError, TypeError, ImportError, RuntimeError, OSError) as error:
        print(f"keras-gemma {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
