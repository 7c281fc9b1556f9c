"""TextStreamer: pieces of a growing id sequence, whole characters only."""

from keras_gemma.generation.streaming import TextStreamer
from tests.tokenizer_fixtures import tiny_proto, tiny_tokenizer  # noqa: F401

# "€", "Ω", "жук" and "🚀" are not in the tiny vocabulary: byte fallback.
TEXT = "Hello world! 5€ Ωmega жук 🚀 café 你好  spaces\tand\nlines"


def _prefixes(ids):
    return [ids[: end + 1] for end in range(len(ids))]


def test_pieces_concatenate_to_the_text_without_broken_characters(
    tiny_tokenizer,  # noqa: F811
):
    ids = tiny_tokenizer.tokenize(TEXT)
    pieces = list(TextStreamer(tiny_tokenizer.detokenize).stream(_prefixes(ids)))
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in piece for piece in pieces)
    # Some characters span several byte tokens: fewer pieces than tokens,
    # and those characters arrive whole.
    byte_tokens = [i for i in ids if tiny_tokenizer.id_to_token(i).startswith("<0x")]
    assert byte_tokens and len(pieces) < len(ids)
    assert "€" in pieces and "🚀" in pieces


def test_special_tokens_and_word_boundaries(tiny_tokenizer):  # noqa: F811
    """Pieces equal decoding the whole sequence, special tokens dropped, as
    `generate_postprocess` does."""
    tokenizer = tiny_tokenizer
    ids = tokenizer.tokenize("The quick brown fox")
    ids = (
        ids[:2] + [tokenizer.end_of_turn_token_id] + ids[2:] + [tokenizer.eos_token_id]
    )

    def detokenize(sequence):
        return tokenizer.detokenize(sequence, skip_special_tokens=True)

    pieces = list(TextStreamer(detokenize).stream(_prefixes(ids)))
    assert "".join(pieces) == "The quick brown fox"
    assert " " in "".join(pieces[1:])  # spaces are kept inside the stream


def test_an_unfinished_character_is_flushed_at_the_end(tiny_tokenizer):  # noqa: F811
    ids = tiny_tokenizer.tokenize("ok 🚀")
    truncated = ids[:-1]  # the emoji loses its last byte
    final = tiny_tokenizer.detokenize(truncated)
    assert final.endswith("\ufffd")
    pieces = list(TextStreamer(tiny_tokenizer.detokenize).stream(_prefixes(truncated)))
    assert "".join(pieces) == final
    assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])
