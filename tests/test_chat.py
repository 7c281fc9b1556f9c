import doctest

import pytest

import keras_gemma.chat as chat
from keras_gemma.chat import chat_segments, render_chat
from tests import tokenizer_fixtures

# Shared fixtures; pytest finds them as attributes of this module.
gemma3_gguf_path = tokenizer_fixtures.gemma3_gguf_path
gemma3_reference = tokenizer_fixtures.gemma3_reference
gemma3_tokenizer = tokenizer_fixtures.gemma3_tokenizer
tiny_proto = tokenizer_fixtures.tiny_proto
tiny_tokenizer = tokenizer_fixtures.tiny_tokenizer

USER = {"role": "user", "content": "What is the capital of France?"}
MODEL = {"role": "model", "content": "Paris."}
USER2 = {"role": "user", "content": "And of Italy?"}
MODEL2 = {"role": "assistant", "content": "Rome."}
SYSTEM = {"role": "system", "content": "You are a terse geography tutor."}


def test_single_turn():
    assert render_chat([USER]) == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
    )
    assert render_chat([USER], add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert render_chat([USER], add_generation_prompt=True, add_bos=False) == (
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_multi_turn():
    expected = (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\nRome.<end_of_turn>\n"
    )
    assert render_chat([USER, MODEL, USER2, MODEL2]) == expected
    assert (
        render_chat([USER, MODEL, USER2], add_generation_prompt=True)
        == (expected[: expected.index("Rome.")])
    )


def test_system_prompt():
    assert render_chat([SYSTEM, USER, MODEL]) == (
        "<bos><start_of_turn>user\nYou are a terse geography tutor.\n\n"
        "What is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
    )
    # Only the first user turn carries the system text.
    rendered = render_chat([SYSTEM, USER, MODEL, USER2], add_generation_prompt=True)
    assert rendered.count("You are a terse geography tutor.") == 1
    assert rendered.endswith(
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_contents_are_trimmed_and_assistant_is_model():
    messages = [
        {"role": "system", "content": "  Be brief. "},
        {"role": "user", "content": "\n  Hi there \t\n"},
        {"role": "assistant", "content": "  Hello!\n\n"},
    ]
    # As the reference template: turn contents are stripped, the system text
    # is used as given, followed by a blank line.
    assert render_chat(messages) == (
        "<bos><start_of_turn>user\n  Be brief. \n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
    )


def test_segments():
    segments = chat_segments([SYSTEM, USER, MODEL2], add_generation_prompt=False)
    assert "".join(text for text, _ in segments) == render_chat([SYSTEM, USER, MODEL2])
    assert [text for text, trained in segments if trained] == [
        "Rome.",
        "<end_of_turn>",
    ]
    assert segments[0] == ("<bos>", False)
    with_prompt = chat_segments([USER], add_generation_prompt=True, add_bos=False)
    assert with_prompt[-1] == ("<start_of_turn>model\n", False)
    assert not any(trained for _, trained in with_prompt)


def test_module_doctests():
    results = doctest.testmod(chat, verbose=False)
    assert results.attempted >= 4
    assert results.failed == 0


def test_rendered_chat_tokenizes_like_transformers(
    gemma3_tokenizer, gemma3_reference, tiny_tokenizer
):
    text = render_chat([SYSTEM, USER, MODEL, USER2], add_generation_prompt=True)
    ids = gemma3_tokenizer.tokenize(text)
    assert ids == gemma3_reference.encode(text, add_special_tokens=False)
    # <bos> <start_of_turn> user \n
    assert ids[:4] == [2, 105, 2364, 107]
    assert ids[-3:] == [105, 4368, 107]  # <start_of_turn> model \n
    assert ids.count(106) == 3  # <end_of_turn>
    # Tokenizing the segments one by one gives the same ids.
    for tokenizer in (gemma3_tokenizer, tiny_tokenizer):
        pieces = []
        for segment, _ in chat_segments([SYSTEM, USER, MODEL, USER2, MODEL2]):
            pieces.extend(tokenizer.tokenize(segment))
        assert pieces == tokenizer.tokenize(
            render_chat([SYSTEM, USER, MODEL, USER2, MODEL2])
        )


@pytest.mark.parametrize(
    "messages, error, message",
    [
        ([{"role": "bot", "content": "hi"}], ValueError, "unknown role 'bot'"),
        ([USER, {"role": "User", "content": "x"}], ValueError, "unknown role 'User'"),
        ([USER, USER2], ValueError, r"messages\[1\] has role 'user' where 'model'"),
        ([MODEL], ValueError, r"messages\[0\] has role 'model' where 'user'"),
        ([USER, SYSTEM], ValueError, "only the first message"),
        ([SYSTEM], ValueError, "followed by a user message"),
        ([SYSTEM, MODEL], ValueError, r"messages\[1\] has role 'model'"),
        ([], ValueError, "is empty"),
        ("Hello", TypeError, "list of"),
        (None, TypeError, "list of"),
        ([("user", "hi")], TypeError, r"messages\[0\] must be a dict"),
        ([{"role": "user"}], ValueError, "no 'content' key"),
        ([{"content": "hi"}], ValueError, "no 'role' key"),
        ([{"role": "user", "content": None}], TypeError, "must be a str"),
        ([{"role": "user", "content": ["hi"]}], TypeError, "must be a str"),
    ],
)
def test_bad_conversations(messages, error, message):
    with pytest.raises(error, match=message):
        render_chat(messages)
