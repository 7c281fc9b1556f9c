"""The turn format of instruction-tuned Gemma models.

A conversation is a list of messages ``{"role": ..., "content": str}``, the
role being ``"user"``, ``"model"`` (or its alias ``"assistant"``), or
``"system"`` (only as the first message). Gemma has no system turn: the system
message is written at the start of the first user turn, followed by a blank
line. Each turn reads ``<start_of_turn>{role}\\n{content}<end_of_turn>\\n`` with
the content stripped of surrounding whitespace, and the whole conversation
starts with ``<bos>``; this is what the chat template shipped with Gemma's
instruction-tuned checkpoints renders.

>>> render_chat([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
'<bos><start_of_turn>user\\nHi!<end_of_turn>\\n<start_of_turn>model\\n'
>>> render_chat(
...     [
...         {"role": "system", "content": "Be brief."},
...         {"role": "user", "content": "Hi!"},
...         {"role": "assistant", "content": "Hello."},
...     ]
... )
'<bos><start_of_turn>user\\nBe brief.\\n\\nHi!<end_of_turn>\\n<start_of_turn>model\\nHello.<end_of_turn>\\n'
"""  # noqa: E501

from collections.abc import Mapping

ROLES = ("system", "user", "model", "assistant")
"""Accepted message roles; ``"assistant"`` is an alias of ``"model"``."""

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


def _check_messages(messages):
    """Validates a conversation; returns (system text or None, turns)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise TypeError(
            "`messages` must be a list of {'role': ..., 'content': ...} dicts; got "
            f"{type(messages).__name__}."
        )
    if not messages:
        raise ValueError("`messages` is empty: a conversation needs a user message.")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"messages[{index}] must be a dict with 'role' and 'content'; got "
                f"{type(message).__name__}."
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{index}] has no {key!r} key.")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(
                f"messages[{index}] has the unknown role {role!r}; the roles are "
                "'system' (first message only), 'user', 'model' and 'assistant' "
                "(an alias of 'model')."
            )
        if not isinstance(content, str):
            raise TypeError(
                f"messages[{index}]['content'] must be a str; got "
                f"{type(content).__name__}."
            )
        turns.append(("model" if role == "assistant" else role, content))

    system = None
    if turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
        if not turns:
            raise ValueError(
                "A system message must be followed by a user message: Gemma writes "
                "the system text at the start of the first user turn."
            )
    for index, (role, _) in enumerate(turns):
        position = index + (1 if system is not None else 0)
        expected = "user" if index % 2 == 0 else "model"
        if role == "system":
            raise ValueError(
                f"messages[{position}] is a system message; only the first message "
                "may have the 'system' role."
            )
        if role != expected:
            raise ValueError(
                f"messages[{position}] has role {role!r} where {expected!r} was "
                "expected: after an optional system message, turns must alternate "
                "user, model, user, model, ... starting with user."
            )
    return system, turns


def chat_segments(messages, add_generation_prompt=False, add_bos=True):
    """The rendered conversation as ``(text, is_model_output)`` pieces.

    Joining the texts gives `render_chat(...)`. The flag is True for the text
    the model is trained to write: the content of each model turn and the
    ``<end_of_turn>`` that closes it (not the ``<start_of_turn>model\\n``
    header, nor the newline after ``<end_of_turn>``). Used to put the loss of
    a fine-tuning run on the model's answers only.

    Args:
        messages: the conversation (see the module docstring).
        add_generation_prompt: end with ``<start_of_turn>model\\n``, the
            opening of the model's next turn.
        add_bos: start with ``<bos>``.

    >>> chat_segments([{"role": "user", "content": "Hi"},
    ...                {"role": "model", "content": "Hey"}], add_bos=False)
    [('<start_of_turn>user\\nHi<end_of_turn>\\n', False), ('<start_of_turn>model\\n', False), ('Hey', True), ('<end_of_turn>', True), ('\\n', False)]
    """  # noqa: E501
    system, turns = _check_messages(messages)
    segments = [(BOS, False)] if add_bos else []
    for index, (role, content) in enumerate(turns):
        text = content.strip()
        if role == "user":
            if index == 0 and system is not None:
                text = system + "\n\n" + text
            segments.append((f"{START_OF_TURN}user\n{text}{END_OF_TURN}\n", False))
        else:
            segments.append((f"{START_OF_TURN}model\n", False))
            segments.append((text, True))
            segments.append((END_OF_TURN, True))
            segments.append(("\n", False))
    if add_generation_prompt:
        segments.append((f"{START_OF_TURN}model\n", False))
    return [(text, flag) for text, flag in segments if text]


def render_chat(messages, add_generation_prompt=False, add_bos=True):
    """Renders a conversation in Gemma's turn format.

    Args:
        messages: list of ``{"role": ..., "content": str}`` dicts; roles
            ``"system"`` (first message only), ``"user"``, ``"model"`` or
            ``"assistant"`` (an alias of ``"model"``), alternating user and
            model turns starting with the user.
        add_generation_prompt: append ``<start_of_turn>model\\n``, the
            opening of the model's reply (for generation).
        add_bos: start with ``<bos>``. `GemmaTokenizer` turns a literal
            ``<bos>`` into the `<bos>` id, and `GemmaCausalLMPreprocessor`
            does not add a second one.

    Returns:
        The conversation as one string.

    Raises:
        TypeError: if `messages` is not a list of dicts with string content.
        ValueError: for an unknown role, a misplaced system message or turns
            that do not alternate.

    >>> render_chat([{"role": "user", "content": " What is 2+2? "},
    ...              {"role": "model", "content": "4"},
    ...              {"role": "user", "content": "And 3+3?"}],
    ...             add_generation_prompt=True, add_bos=False)
    '<start_of_turn>user\\nWhat is 2+2?<end_of_turn>\\n<start_of_turn>model\\n4<end_of_turn>\\n<start_of_turn>user\\nAnd 3+3?<end_of_turn>\\n<start_of_turn>model\\n'
    """  # noqa: E501
    return "".join(
        text for text, _ in chat_segments(messages, add_generation_prompt, add_bos)
    )
