"""The collector is paused while vocabularies and models load, and left as
it was found."""

import gc

import pytest

from keras_gemma.checkpoints import garbage_collection
from keras_gemma.models import gemma_tokenizer
from tests import tokenizer_fixtures

tiny_proto = tokenizer_fixtures.tiny_proto


@pytest.fixture
def collector_enabled():
    was_enabled = gc.isenabled()
    gc.enable()
    yield
    if not was_enabled:
        gc.disable()


def test_paused_restores_the_state_it_found(collector_enabled):
    with garbage_collection.paused():
        assert not gc.isenabled()
        with garbage_collection.paused():
            assert not gc.isenabled()
        # The inner block found it disabled and leaves it so.
        assert not gc.isenabled()
    assert gc.isenabled()

    with pytest.raises(KeyError), garbage_collection.paused():
        raise KeyError("boom")
    assert gc.isenabled()

    gc.disable()
    with garbage_collection.paused():
        pass
    assert not gc.isenabled()  # a caller's choice is kept
    gc.enable()


def test_the_tokenizer_reads_its_vocabulary_with_the_collector_paused(
    tiny_proto, collector_enabled, monkeypatch
):
    seen = []
    parse = gemma_tokenizer._parse_proto

    def recording_parse(data):
        seen.append(gc.isenabled())
        return parse(data)

    monkeypatch.setattr(gemma_tokenizer, "_parse_proto", recording_parse)
    tokenizer = gemma_tokenizer.GemmaTokenizer(proto=tiny_proto)
    assert seen == [False]
    assert gc.isenabled()
    assert tokenizer.token_to_id("<eos>") == 1
    with pytest.raises(ValueError, match="SentencePiece"):
        gemma_tokenizer.GemmaTokenizer(proto=b"not a model")
    assert gc.isenabled()
