"""`keras_gemma.benchmark` and `keras-gemma bench` on the tiny random model.

Only what the numbers are (present, positive, finite) is checked, never how
fast anything ran.
"""

import io
import json
import math

import keras
import pytest

from keras_gemma import benchmark
from keras_gemma.cli import build_parser, main

SPEED_KEYS = (
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "prefill_s",
    "decode_s",
    "first_prefill_s",
    "first_decode_s",
)


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a shared machine: one PyTorch thread is faster."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_local_cache_is_bounded_at_long_context():
    lm = benchmark.build_causal_lm("tiny")
    short = benchmark.measure_kv_cache(lm, batch_size=2, prompt_length=16, new_tokens=8)
    # Tiny: 1 local layer (window 16) and 1 global layer, one K/V head of 32,
    # float32, batch 2; the global cache holds prompt + output buckets (16+16).
    assert short["kv_cache_local_bytes"] == 2 * 2 * 16 * 32 * 4
    assert short["kv_cache_global_bytes"] == 2 * 2 * 32 * 32 * 4
    long = benchmark.measure_kv_cache(lm, batch_size=2, prompt_length=64, new_tokens=8)
    assert long["kv_cache_local_bytes"] == short["kv_cache_local_bytes"]
    assert long["kv_cache_global_bytes"] == 2 * 2 * 80 * 32 * 4
    assert long["kv_cache_bytes"] == (
        long["kv_cache_local_bytes"] + long["kv_cache_global_bytes"]
    )


def test_bench_command_writes_json(tmp_path, capsys):
    output = tmp_path / "bench.json"
    out = io.StringIO()
    status = main(
        [
            "bench",
            "--model",
            "tiny",
            "--in-process",
            "--repeats",
            "1",
            "--new-tokens",
            "4",
            "--fit-length",
            "8",
            "--fit-steps",
            "2",
            "--output",
            str(output),
        ],
        out=out,
    )
    assert status == 0, out.getvalue()
    table = out.getvalue().splitlines()
    assert table[0].split()[:3] == ["backend", "model", "dtype"]
    assert table[1].split()[:2] == [keras.backend.backend(), "tiny"]

    report = json.loads(output.read_text())
    assert positive(report["machine"]["logical_cpus"])
    (result,) = report["results"]
    for key in (
        *SPEED_KEYS,
        "load_s",
        "first_token_s",
        "cold_start_s",
        "second_prompt_s",
        "peak_rss_mb",
        "lora_fit_step_s",
        "lora_first_step_s",
        "lora_peak_rss_mb",
        "kv_cache_bytes",
        "parameters",
    ):
        assert positive(result[key]), key
    assert len(result["decode_times_s"]) == 1
    assert result["new_traces"] == 0 and result["second_prompt_length"] == 15
    assert result["lora_trainable_params"] > 0
    assert "lora_error" not in result and "error" not in result


def test_fresh_process_cold_start_and_peak_memory():
    result = benchmark.measure_in_fresh_process(
        {"model": "tiny", "new_tokens": 3, "speed": False, "lora": False, "threads": 1}
    )
    assert "error" not in result, result
    assert result["backend"] == keras.backend.backend()
    for key in (
        "interpreter_s",
        "import_s",
        "load_s",
        "first_token_s",
        "cold_start_s",
        "peak_rss_mb",
    ):
        assert positive(result[key]), key
    assert result["cold_start_s"] >= result["import_s"] + result["first_token_s"]
    assert result["peak_rss_mb"] >= result["rss_after_load_mb"] > 0


def test_bench_arguments_and_table():
    args = build_parser().parse_args(
        [
            "bench",
            "--preset",
            "gemma3_270m",
            "--batch-size",
            "1",
            "4",
            "--quantize",
            "int8",
        ]
    )
    assert args.model == "gemma3_270m" and args.batch_size == [1, 4]
    assert args.quantize == "int8" and args.prompt_length == [16]
    assert benchmark.same_bucket_length(1024) == 1023
    table = benchmark.format_table(
        [{"backend": "jax", "dtype": "float32", "quantize": "int8", "error": "x"}],
        markdown=True,
    )
    assert table.splitlines()[2].startswith("| jax | - | float32+int8 |")
    assert "error" in table
    line = benchmark.describe_machine()
    assert "CPUs" in line and "Python" in line


def test_machine_description_names_the_cpu_vector_extensions(tmp_path):
    from keras_gemma import benchmark

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: X\nflags\t\t: fpu avx512_vnni sse avx2\n")
    assert benchmark._cpu_vector_extensions(cpuinfo) == ["avx2", "avx512_vnni"]
    assert benchmark._cpu_vector_extensions(tmp_path / "none") == []
    info = dict(benchmark.machine_info(), cpu="X", cpu_vector_extensions=["avx2"])
    assert benchmark.describe_machine(info).startswith("X (avx2), ")
