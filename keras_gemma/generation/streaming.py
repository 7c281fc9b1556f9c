"""Streaming text: turning a growing sequence of token ids into text pieces.

Decoding token by token and concatenating the pieces goes wrong in two
ways: a character written with byte-fallback tokens spans several tokens
(each alone is an invalid UTF-8 fragment), and SentencePiece spaces
(`▁`) and special tokens only make sense in context. `TextStreamer`
instead decodes the whole generated sequence each time and yields what was
added since the last piece, holding back a trailing incomplete character
(decoded as U+FFFD) until it is complete. The concatenation of the pieces is
exactly the decoding of the final sequence.
"""

import numpy as np

_REPLACEMENT = "\ufffd"


class TextStreamer:
    """Yields text pieces for a sequence of token ids that grows.

    Args:
        detokenize: a function from a 1-D array of ids to a string, e.g. a
            preprocessor's `generate_postprocess`.

    Example:

    >>> pieces = {1: "Caf", 2: b"\\xc3", 3: b"\\xa9", 4: "!"}
    >>> def decode(ids):
    ...     data = b"".join(
    ...         p if isinstance(p, bytes) else p.encode() for p in
    ...         (pieces[int(i)] for i in ids))
    ...     return data.decode("utf-8", errors="replace")
    >>> streamer = TextStreamer(decode)
    >>> list(streamer.stream([[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]))
    ['Caf', 'é', '!']
    """

    def __init__(self, detokenize):
        self.detokenize = detokenize

    def _decode(self, ids):
        return self.detokenize(np.asarray(ids, np.int32).reshape(-1))

    def stream(self, sequences):
        """Yields the text added by each new, longer sequence of ids.

        Args:
            sequences: an iterable of 1-D id sequences, each extending the
                previous one.
        """
        emitted = ""
        text = ""
        for ids in sequences:
            text = self._decode(ids)
            stable = text.rstrip(_REPLACEMENT)
            if len(stable) > len(emitted) and stable.startswith(emitted):
                yield stable[len(emitted) :]
                emitted = stable
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted) :]
