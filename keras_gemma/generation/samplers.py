"""Samplers: how the next token is chosen from the model's logits.

A sampler is a small configuration object. `GemmaCausalLM.generate` runs it
inside the compiled decode loop, so its math goes through `keras.ops` and
the only randomness it sees is a tensor of uniform noise drawn for the
current step from the call's seed (stateless, so a fixed seed reproduces
the same text on a given backend).

Random choices use the Gumbel-max trick: `argmax(logits + g)` with
`g = -log(-log(u))`, `u` uniform, is an exact sample from
`softmax(logits)`. Filtering samplers (top-k, top-p) first push the
excluded logits to a very negative value.

Samplers can be given as objects or by name, e.g. `"greedy"`, `"random"`,
`"top_k"`, `"top_p"`, `"beam"` (see `get`).

Example:

>>> import numpy as np
>>> logits = np.array([[0.0, 3.0, 1.0]], "float32")
>>> int(GreedySampler().next_tokens(logits)[0])
1
>>> get("top_k").k
5
"""

import keras
from keras import ops

# Logit given to excluded tokens; finite so that arithmetic never meets inf.
_EXCLUDED = -1e30
# Uniform noise is kept inside (tiny, 1) so the Gumbel transform is finite.
_TINY = 1e-20


def _check_positive_number(value, name, allowed):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    if not value > 0:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return float(value)


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def first_argmax(values):
    """`ops.argmax(values, axis=-1)` as int32, computed as a maximum and
    then the first position holding it (or the first NaN, as `argmax`).

    Two plain reductions instead of one reduction over (value, index)
    pairs, which XLA on CPU runs far slower (measured over the 270M model's
    262,144 logits inside the decode loop: 2.4 ms per token, a tenth of an
    int8 decode step). On PyTorch, whose `argmax` already returns the first
    maximum or the first NaN, wide rows are split into blocks instead.

    >>> import numpy as np
    >>> values = np.array([[1.0, 3.0, 3.0, 2.0], [0.0, np.nan, 5.0, 1.0]])
    >>> ops.convert_to_numpy(first_argmax(values.astype("float32"))).tolist()
    [1, 1]
    """
    if keras.backend.backend() == "torch":
        return _torch_first_argmax(values)
    size = values.shape[-1]
    largest = ops.max(values, axis=-1, keepdims=True)
    positions = ops.arange(size, dtype="int32")
    # NaNs are keyed below every other position, so the first NaN wins
    # whether or not the backend's maximum propagates NaN (XLA's does not).
    keys = ops.where(
        ops.isnan(values),
        positions - size,
        ops.where(ops.equal(values, largest), positions, size),
    )
    first = ops.min(keys, axis=-1)
    return ops.where(first < 0, first + size, first)


# PyTorch's `argmax` of one row runs on one thread, one element after the
# other: 0.34 ms over the 270M model's 262,144 logits, against 0.08 ms for
# the maxima of blocks of this many values and then the first block holding
# the largest.
_TORCH_ARGMAX_BLOCK = 512


def _torch_first_argmax(values):
    import torch

    values = ops.convert_to_tensor(values)
    size = values.shape[-1]
    if size % _TORCH_ARGMAX_BLOCK or size < 4 * _TORCH_ARGMAX_BLOCK:
        return torch.argmax(values, dim=-1).int()
    blocks = values.reshape(*values.shape[:-1], -1, _TORCH_ARGMAX_BLOCK)
    # Both reductions return the first of equal maxima (or the first NaN).
    maxima, positions = torch.max(blocks, dim=-1)
    block = torch.argmax(maxima, dim=-1, keepdim=True)
    position = torch.gather(positions, -1, block)
    return (block * _TORCH_ARGMAX_BLOCK + position).squeeze(-1).int()


def gumbel_argmax(logits, noise):
    """Index of `argmax(logits + Gumbel(noise))` along the last axis.

    Args:
        logits: `(batch, n)` float32 logits.
        noise: `(batch, n)` uniform noise in `(0, 1)`.
    """
    noise = ops.clip(ops.cast(noise, "float32"), _TINY, 1.0 - 1e-7)
    gumbel = -ops.log(-ops.log(noise))
    return first_argmax(logits + gumbel)


class Sampler:
    """Base class: chooses one token per row from float32 logits.

    Subclasses implement `next_tokens(logits, noise_fn=None)`, where
    `noise_fn(shape)` returns uniform noise in `(0, 1)` for this step.
    Samplers with `needs_noise = False` never call it.

    Example:

    >>> import numpy as np
    >>> class ArgMin(Sampler):
    ...     name = "arg_min"
    ...     needs_noise = False
    ...     def next_tokens(self, logits, noise_fn=None):
    ...         return ops.argmin(logits, axis=-1)
    >>> int(ArgMin().next_tokens(np.array([[3.0, -1.0, 2.0]]))[0])
    1
    """

    name = None
    needs_noise = True
    is_beam_search = False

    def next_tokens(self, logits, noise_fn=None):
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def cache_key(self):
        """A hashable description; compiled decode loops are kept per key."""
        return (type(self).__name__,) + tuple(sorted(self.get_config().items()))

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class GreedySampler(Sampler):
    """Always picks the most likely token.

    Example:

    >>> import numpy as np
    >>> int(GreedySampler().next_tokens(np.array([[0.1, 0.2, 0.05]]))[0])
    1
    """

    name = "greedy"
    needs_noise = False

    def next_tokens(self, logits, noise_fn=None):
        return first_argmax(logits)


class RandomSampler(Sampler):
    """Samples from the full distribution `softmax(logits / temperature)`.

    Args:
        temperature: positive; below 1 sharpens the distribution, above 1
            flattens it.

    Example:

    >>> import numpy as np
    >>> sampler = RandomSampler(temperature=0.7)
    >>> noise = lambda shape: np.full(shape, 0.5, "float32")
    >>> int(sampler.next_tokens(np.array([[0.0, 9.0, 0.0]], "float32"), noise)[0])
    1
    """

    name = "random"

    def __init__(self, temperature=1.0):
        self.temperature = _check_positive_number(
            temperature, "temperature", "a number > 0"
        )

    def next_tokens(self, logits, noise_fn=None):
        logits = ops.cast(logits, "float32") / self.temperature
        return gumbel_argmax(logits, noise_fn(ops.shape(logits)))

    def get_config(self):
        return {"temperature": self.temperature}


class TopKSampler(Sampler):
    """Samples among the `k` most likely tokens.

    Args:
        k: positive number of candidate tokens; `k=1` is greedy.
        temperature: positive temperature applied before sampling.

    Example:

    >>> import numpy as np
    >>> noise = lambda shape: np.full(shape, 0.5, "float32")
    >>> logits = np.array([[0.0, 5.0, 4.0, -1.0]], "float32")
    >>> int(TopKSampler(k=1).next_tokens(logits, noise)[0])
    1
    """

    name = "top_k"

    def __init__(self, k=5, temperature=1.0):
        self.k = _check_positive_int(k, "k")
        self.temperature = _check_positive_number(
            temperature, "temperature", "a number > 0"
        )

    def next_tokens(self, logits, noise_fn=None):
        logits = ops.cast(logits, "float32") / self.temperature
        if self.k == 1:  # exactly greedy, whatever the backend does on ties
            return first_argmax(logits)
        k = min(self.k, int(logits.shape[-1]))
        values, indices = ops.top_k(logits, k, sorted=True)
        choice = gumbel_argmax(values, noise_fn(ops.shape(values)))
        chosen = ops.take_along_axis(
            ops.cast(indices, "int32"), choice[:, None], axis=-1
        )
        return chosen[:, 0]

    def get_config(self):
        return {"k": self.k, "temperature": self.temperature}


class TopPSampler(Sampler):
    """Nucleus sampling: samples among the fewest most likely tokens whose
    probabilities add up to at least `p`.

    Args:
        p: probability mass to keep, in `(0, 1]`.
        temperature: positive temperature applied before sampling.
        k: optional limit on candidates considered (the `k` most likely),
            which avoids sorting the whole vocabulary at every step.

    Example:

    >>> import numpy as np
    >>> noise = lambda shape: np.full(shape, 0.5, "float32")
    >>> logits = np.log(np.array([[0.05, 0.7, 0.25]], "float32"))
    >>> int(TopPSampler(p=0.5).next_tokens(logits, noise)[0])
    1
    """

    name = "top_p"

    def __init__(self, p=0.9, temperature=1.0, k=None):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"`top_p` (`p`) must be in (0, 1], got {p!r}.")
        self.p = float(p)
        self.temperature = _check_positive_number(
            temperature, "temperature", "a number > 0"
        )
        self.k = None if k is None else _check_positive_int(k, "k")

    def next_tokens(self, logits, noise_fn=None):
        logits = ops.cast(logits, "float32") / self.temperature
        vocabulary = int(logits.shape[-1])
        k = vocabulary if self.k is None else min(self.k, vocabulary)
        values, indices = ops.top_k(logits, k, sorted=True)
        probabilities = ops.softmax(values, axis=-1)
        mass_before = ops.cumsum(probabilities, axis=-1) - probabilities
        keep = mass_before < self.p
        values = ops.where(keep, values, _EXCLUDED)
        choice = gumbel_argmax(values, noise_fn(ops.shape(values)))
        chosen = ops.take_along_axis(
            ops.cast(indices, "int32"), choice[:, None], axis=-1
        )
        return chosen[:, 0]

    def get_config(self):
        return {"p": self.p, "temperature": self.temperature, "k": self.k}


class BeamSampler(Sampler):
    """Beam search: keeps the `num_beams` most likely continuations.

    At each step every live beam is extended by every token; the
    `num_beams` best by total log-probability survive. A beam that emits a
    stop token is finished and keeps its score. The returned sequence is
    the beam with the best `log_probability / length ** length_penalty`.
    With one beam this is greedy decoding.

    Args:
        num_beams: positive number of beams.
        length_penalty: exponent of the length normalization of the final
            choice; 0 compares raw log-probabilities.

    Example:

    >>> sampler = BeamSampler(num_beams=4)
    >>> sampler.num_beams, sampler.is_beam_search
    (4, True)
    """

    name = "beam"
    needs_noise = False
    is_beam_search = True

    def __init__(self, num_beams=4, length_penalty=1.0):
        self.num_beams = _check_positive_int(num_beams, "num_beams")
        if isinstance(length_penalty, bool) or not isinstance(
            length_penalty, (int, float)
        ):
            raise ValueError(
                f"`length_penalty` must be a number, got {length_penalty!r}."
            )
        self.length_penalty = float(length_penalty)

    def next_tokens(self, logits, noise_fn=None):
        raise ValueError(
            "BeamSampler chooses among beams inside the decode loop; it has no "
            "per-row `next_tokens`."
        )

    def get_config(self):
        return {"num_beams": self.num_beams, "length_penalty": self.length_penalty}


SAMPLERS = {
    cls.name: cls
    for cls in (GreedySampler, RandomSampler, TopKSampler, TopPSampler, BeamSampler)
}


def get(identifier):
    """Returns a `Sampler` from a name, a config dict or a `Sampler`.

    Args:
        identifier: a `Sampler` instance (returned as is); one of the names
            `"greedy"`, `"random"`, `"top_k"`, `"top_p"`, `"beam"` (default
            settings); or a dict `{"name": ..., **settings}`, e.g.
            `{"name": "top_p", "p": 0.8, "temperature": 0.7}`.

    Raises:
        ValueError: for an unknown name or invalid settings.

    Example:

    >>> get({"name": "top_p", "p": 0.8}).p
    0.8
    """
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, str):
        name, settings = identifier, {}
    elif isinstance(identifier, dict) and isinstance(identifier.get("name"), str):
        settings = dict(identifier)
        name = settings.pop("name")
    else:
        raise ValueError(
            "`sampler` must be a Sampler, a sampler name or a dict with a "
            f"'name' key; allowed names: {sorted(SAMPLERS)}. Got {identifier!r}."
        )
    if name not in SAMPLERS:
        raise ValueError(
            f"Unknown `sampler` {name!r}; allowed names: {sorted(SAMPLERS)}."
        )
    try:
        return SAMPLERS[name](**settings)
    except TypeError as error:
        raise ValueError(f"Invalid settings for sampler {name!r}: {error}") from None


def serialize(sampler):
    """The config dict of a sampler, `{"name": ..., **settings}`.

    Example:

    >>> serialize(TopKSampler(k=3))
    {'name': 'top_k', 'k': 3, 'temperature': 1.0}
    """
    return {"name": sampler.name, **sampler.get_config()}


__all__ = [
    "BeamSampler",
    "GreedySampler",
    "RandomSampler",
    "Sampler",
    "TopKSampler",
    "TopPSampler",
    "get",
    "gumbel_argmax",
    "serialize",
]
