"""The compiled decode loop: prefill once, then one token per step.

`DecodeEngine` turns right-padded prompts into generated token ids. It
writes the prompts left-padded into a bucketed width (so every prompt ends
at the same column and one prefill serves the whole batch), prefills the
per-layer key/value caches in one forward pass, takes logits only at the
last prompt column, then decodes one token per step against the caches.

The step logic is written once with `keras.ops`; a small per-backend runner
compiles it and drives the loop:

- JAX: a stateless function of the model's variable values (through
  `keras.StatelessScope`) under `jax.jit`, with `jax.lax.while_loop` over
  the steps and the caches in the loop carry (XLA updates them in place).
  The streaming step function donates its state.
- TensorFlow: `tf.function(jit_compile=True)` around the same function with
  `tf.while_loop`. On CPU a float32 model's prefill of a short prompt,
  which has no loop, runs in TensorFlow's graph runtime instead: about as
  fast there, without XLA's compilation (see `_graph_runtime_suffices`).
- PyTorch: under `torch.inference_mode()`, the caches are allocated once
  by the prefill and written in place. One model step is recorded per
  shape bucket as a graph of aten operations (`torch.fx` `make_fx`) and
  replayed at every token through TorchScript's interpreter, so neither
  the Keras layer machinery nor Python runs per operation (`torch.compile`
  was measured: minutes of compilation on CPU for a small gain). The loop
  checks whether every row has stopped only every few steps, so there is
  no host round trip per token.

Prompt widths and output lengths are rounded up to buckets
(`bucket_length`), and the compiled functions are kept per sampler, so a
new prompt length in a bucket reuses the compiled program; each backend
keeps one trace (JAX, TensorFlow) or recorded step (PyTorch) per bucket
and batch size. `trace_count` counts them, so tests can check that a
second call does not retrace.

Rows stop on their own: after a stop token (kept in the output) or their
own token budget they emit padding, and the loop ends when every row has
stopped or the longest budget is used up.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_gemma.generation import samplers as samplers_lib
from keras_gemma.layers import storage_layout

# Logit given to excluded beam candidates; finite to keep arithmetic clean.
_EXCLUDED = -1e30


def bucket_length(length, minimum=16):
    """Rounds `length` up to a bucket: `minimum`, then powers of two up to
    1024, then multiples of 512.

    Example:

    >>> [bucket_length(n) for n in (1, 16, 17, 100, 1024, 1025)]
    [16, 16, 32, 128, 1024, 1536]
    """
    length = max(int(length), 1)
    if length <= minimum:
        return minimum
    if length <= 1024:
        return 1 << (length - 1).bit_length()
    return -(-length // 512) * 512


# -- per-backend runners ---------------------------------------------------


class _Runner:
    """Compiles a function of tensors and drives `while` loops on a backend."""

    # Eager runners drive loops from the host and need the iteration count.
    eager = False

    def compile(self, function, variables, donate_state, on_trace, xla=True):
        """`function` compiled for repeated calls. `xla=False` allows a
        backend with a choice (TensorFlow) to run it without XLA."""
        raise NotImplementedError

    def while_loop(self, cond, body, state, iterations=None):
        raise NotImplementedError

    def capture(self, function, variables, on_trace):
        """Makes `function` (one model step) cheap to call repeatedly.
        Compiled backends already compile the whole loop: unchanged."""
        return function

    def make_rng(self, seed):
        """The per-call random state from a `(2,)` int32 seed tensor."""
        return seed

    def uniform(self, rng, step, shape):
        raise NotImplementedError

    def to_tensor(self, value):
        return ops.convert_to_tensor(value)


class _JaxRunner(_Runner):
    def compile(self, function, variables, donate_state, on_trace, xla=True):
        import jax

        variables = list(variables)

        def stateless(values, *args):
            on_trace()
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return function(*args)

        jitted = jax.jit(stateless, donate_argnums=(1,) if donate_state else ())

        def call(*args):
            return jitted([variable.value for variable in variables], *args)

        return call

    def while_loop(self, cond, body, state, iterations=None):
        import jax

        return jax.lax.while_loop(cond, body, state)

    def make_rng(self, seed):
        return ops.cast(seed, "uint32")

    def uniform(self, rng, step, shape):
        import jax

        key = jax.random.fold_in(rng, step)
        return jax.random.uniform(key, tuple(shape), minval=1e-20, maxval=1.0)

    def to_tensor(self, value):
        return value  # numpy arrays go straight into the jitted function


class _TensorFlowRunner(_Runner):
    def compile(self, function, variables, donate_state, on_trace, xla=True):
        import tensorflow as tf

        def traced(*args):
            on_trace()
            return function(*args)

        # No AutoGraph: the loops are explicit `tf.while_loop`s, and
        # converting every layer's Python source took about a second of
        # each trace (the 270M model's first token on TensorFlow).
        return tf.function(
            traced, jit_compile=xla, reduce_retracing=False, autograph=False
        )

    def while_loop(self, cond, body, state, iterations=None):
        import tensorflow as tf

        (state,) = tf.while_loop(
            lambda s: cond(s), lambda s: (body(s),), (state,), parallel_iterations=1
        )
        return state

    def uniform(self, rng, step, shape):
        import tensorflow as tf

        seed = tf.random.experimental.stateless_fold_in(rng, step)
        return tf.random.stateless_uniform(
            tuple(shape), seed=seed, minval=1e-20, maxval=1.0
        )


class _TorchRunner(_Runner):
    eager = True
    # Steps between checks that every row has stopped (a host round trip).
    check_every = 8

    def compile(self, function, variables, donate_state, on_trace, xla=True):
        import torch

        def call(*args):
            with torch.inference_mode():
                return function(*args)

        return call

    def while_loop(self, cond, body, state, iterations=None):
        # Whether every row has stopped is read on the host only every
        # `check_every` steps; steps after a row stopped only append
        # padding, so overrunning by a few steps does not change the result.
        taken = 0
        while taken < iterations and bool(cond(state)):
            for _ in range(min(self.check_every, iterations - taken)):
                state = body(state)
                taken += 1
        return state

    def capture(self, function, variables, on_trace):
        """Records the aten operations of one model step per input shapes
        (`torch_graph.record_operations`) and replays them: the Keras layer
        machinery runs once per shape bucket instead of at every token,
        operations repeated on the same inputs are recorded once, and the
        replay runs in TorchScript's interpreter where it can
        (`torch_graph`). The variables are inputs of the recorded graph, so
        it always sees their current values; cache writes stay in place."""
        import torch.utils._pytree as pytree

        from keras_gemma.generation.torch_graph import (
            record_operations,
            remove_repeated_operations,
            replay_with_torchscript,
        )

        variables = list(variables)
        graphs = {}

        def stateless(values, *args):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return function(*args)

        def call(*args):
            key = tuple(
                (tuple(tensor.shape), tensor.dtype, tensor.device)
                for tensor in pytree.tree_leaves(args)
            )
            values = [variable.value for variable in variables]
            if key not in graphs:
                on_trace()
                try:
                    graph = remove_repeated_operations(
                        record_operations(stateless, values, *args)
                    )
                except Exception as error:  # an operation make_fx cannot record
                    warnings.warn(
                        "Decoding runs eagerly: recording the decode step with "
                        f"torch.fx failed ({type(error).__name__}: {error}).",
                        stacklevel=2,
                    )
                    graph = None
                if graph is not None:
                    try:
                        graph = replay_with_torchscript(
                            graph, values, *args, fixed_inputs=len(values)
                        )
                    except Exception:  # replayed from Python instead
                        pass
                graphs[key] = graph
            if graphs[key] is None:
                return stateless(values, *args)
            # Recording ran the step once too; its cache writes are
            # idempotent, so running the recorded graph now is correct.
            return graphs[key](values, *args)

        return call

    def make_rng(self, seed):
        import torch

        values = np.asarray(ops.convert_to_numpy(seed)).astype(np.int64) % 2**32
        generator = torch.Generator(device=seed.device)
        generator.manual_seed(int(values[0]) + (int(values[1]) << 32))
        return generator

    def uniform(self, rng, step, shape):
        import torch

        noise = torch.rand(tuple(shape), generator=rng, device=rng.device)
        return noise.clamp_(min=1e-20)


def _runner():
    backend = keras.backend.backend()
    if backend == "jax":
        return _JaxRunner()
    if backend == "tensorflow":
        return _TensorFlowRunner()
    if backend == "torch":
        return _TorchRunner()
    raise ValueError(
        f"Generation needs the JAX, TensorFlow or PyTorch backend, not {backend!r}."
    )


# -- the generation programs (backend-agnostic step logic) -----------------


def _int32(value):
    return ops.cast(value, "int32")


def _is_stop(tokens, stop_ids):
    """True where `tokens` is one of `stop_ids` (padded with -1)."""
    return ops.any(ops.equal(tokens[..., None], stop_ids), axis=-1)


def _start_columns(padding_mask):
    """First real column of each left-padded row."""
    width = padding_mask.shape[1]
    return width - ops.sum(_int32(padding_mask), axis=1)


# Prefills of more prompt tokens than this are compiled by XLA on
# TensorFlow even where `_graph_runtime_suffices`.
_GRAPH_RUNTIME_MAX_PROMPT_TOKENS = 1024


def _graph_runtime_suffices(backbone):
    """Whether a program without loops (the prefill) of `backbone` runs in
    TensorFlow's graph runtime rather than compiled by XLA.

    True on CPU for a model computing in float32 with float weights. The
    products are library calls either way: measured on the 270M model, a
    16-token prompt prefills in 77 ms by both, while 200 and 1,000 tokens
    (or 4 prompts of 16) take 10-20% longer in the graph runtime. The first
    token of each prompt bucket comes about 1.9 s sooner (4.4 -> 2.6 s),
    the compilation of ten or more such prefills. Longer prompts lose more
    (2,048 tokens: 6.0 against 4.8 s; 4,096: 19.9 against 14.8 s, where
    the graph runtime's first call is already the slower), so prompts of
    more than `_GRAPH_RUNTIME_MAX_PROMPT_TOKENS` tokens (the batch's, in
    its bucket) are compiled whatever this says. Loops are always
    compiled (the graph runtime pays per operation and iteration), and so
    are 16-bit and int8 models, whose speed comes from XLA fusing each
    weight's conversion into its product (bfloat16+int8 prefill: 90 ms
    against 620 without XLA).
    """
    return (
        keras.backend.backend() == "tensorflow"
        and storage_layout.is_xla_on_cpu()
        and backbone.compute_dtype == "float32"
        and not any(
            keras.backend.standardize_dtype(variable.dtype) == "int8"
            for variable in backbone.variables
        )
    )


def _model_step(backbone):
    """One decoding step of the model: float32 logits of the next tokens
    and the updated caches."""

    def step(token_ids, column, start_columns, caches):
        hidden, caches = backbone.decode(token_ids, column, start_columns, caches)
        logits = backbone.token_embedding(hidden, reverse=True)[:, 0, :]
        return logits, [tuple(cache) for cache in caches]

    return step


class _TokenProgram:
    """One token per row and step, chosen by a token sampler."""

    def __init__(
        self, backbone, sampler, runner, pad_token_id, model_step, record_logits=False
    ):
        self.backbone = backbone
        self.sampler = sampler
        self.runner = runner
        self.pad_token_id = pad_token_id
        self.model_step = model_step
        self.record_logits = record_logits

    def _logits(self, hidden):
        """Float32 logits of `(batch, 1, hidden_dim)` hidden states."""
        return self.backbone.token_embedding(hidden, reverse=True)[:, 0, :]

    def _choose(self, state, logits, inputs):
        """Samples this step's tokens and records them."""
        step, rng = state["step"], state["rng"]

        def noise(shape):
            return self.runner.uniform(rng, step, shape)

        tokens = _int32(self.sampler.next_tokens(logits, noise))
        tokens = ops.where(state["done"], self.pad_token_id, tokens)
        zero = ops.zeros((), "int32")
        generated = ops.slice_update(state["generated"], [zero, step], tokens[:, None])
        done = ops.logical_or(state["done"], _is_stop(tokens, inputs["stop_ids"]))
        done = ops.logical_or(done, step + 1 >= inputs["limits"])
        state = dict(state)
        state.update(step=step + 1, tokens=tokens, done=done, generated=generated)
        if self.record_logits:
            state["logits"] = ops.slice_update(
                state["logits"], [zero, step, zero], logits[:, None, :]
            )
        return state

    def start(self, inputs):
        """Prefills the prompts and picks the first new token."""
        token_ids = inputs["token_ids"]
        prompt_width = token_ids.shape[1]
        total = prompt_width + inputs["generated"].shape[1]
        hidden, caches = self.backbone.prefill(token_ids, inputs["padding_mask"], total)
        logits = self._logits(hidden[:, -1:, :])
        state = {
            "step": ops.zeros((), "int32"),
            "tokens": ops.zeros((token_ids.shape[0],), "int32"),
            "done": inputs["limits"] <= 0,
            "generated": _int32(inputs["generated"]),
            "caches": [tuple(cache) for cache in caches],
            "rng": self.runner.make_rng(inputs["seed"]),
        }
        if self.record_logits:
            state["logits"] = ops.zeros(
                tuple(inputs["generated"].shape) + (logits.shape[-1],), "float32"
            )
        return self._choose(state, logits, inputs)

    def _decode(self, state, inputs):
        """Feeds the last tokens; returns float32 logits and new caches."""
        column = inputs["token_ids"].shape[1] + state["step"] - 1
        return self.model_step(
            state["tokens"][:, None],
            column,
            _start_columns(inputs["padding_mask"]),
            state["caches"],
        )

    def _body(self, state, inputs):
        logits, caches = self._decode(state, inputs)
        state = dict(state)
        state["caches"] = caches
        return self._choose(state, logits, inputs)

    def _all_done(self, state):
        return ops.all(state["done"])

    def advance(self, state, inputs):
        """Decodes until step `inputs["until"]`, the budget, or all stopped."""
        until = ops.minimum(inputs["until"], inputs["num_steps"])

        def cond(state):
            return ops.logical_and(
                state["step"] < until, ops.logical_not(self._all_done(state))
            )

        iterations = None
        if self.runner.eager:
            iterations = int(until) - int(state["step"])
        return self.runner.while_loop(
            cond, lambda state: self._body(state, inputs), state, iterations
        )

    def result(self, state):
        if self.record_logits:
            return state["generated"], state["logits"]
        return state["generated"]

    def run(self, inputs):
        """The whole generation: prefill, then the decode loop."""
        return self.result(self.advance(self.start(inputs), inputs))


class _BeamProgram(_TokenProgram):
    """Beam search: `num_beams` hypotheses per row, rows laid out as
    `batch * num_beams` in the caches."""

    def start(self, inputs):
        token_ids = inputs["token_ids"]
        batch, prompt_width = token_ids.shape
        beams = self.sampler.num_beams
        total = prompt_width + inputs["generated"].shape[1]
        hidden, caches = self.backbone.prefill(token_ids, inputs["padding_mask"], total)
        log_probs = ops.log_softmax(self._logits(hidden[:, -1:, :]), axis=-1)
        scores, tokens = ops.top_k(log_probs, beams, sorted=True)
        tokens = _int32(tokens)
        limits = inputs["limits"][:, None]
        skipped = limits <= 0
        tokens = ops.where(skipped, self.pad_token_id, tokens)
        scores = ops.where(skipped, 0.0, scores)
        generated = _int32(inputs["generated"])
        sequences = ops.repeat(generated[:, None, :], beams, axis=1)
        zero = ops.zeros((), "int32")
        sequences = ops.slice_update(sequences, [zero, zero, zero], tokens[..., None])
        done = ops.logical_or(skipped, _is_stop(tokens, inputs["stop_ids"]))
        done = ops.logical_or(done, limits <= 1)
        return {
            "step": ops.ones((), "int32"),
            "tokens": ops.reshape(tokens, (batch * beams,)),
            "done": done,
            "scores": scores,
            "lengths": ops.where(skipped, 0, ops.ones_like(tokens)),
            "generated": sequences,
            "caches": [
                tuple(ops.repeat(tensor, beams, axis=0) for tensor in cache)
                for cache in caches
            ],
            "rng": self.runner.make_rng(inputs["seed"]),
        }

    def _decode(self, state, inputs):
        beams = self.sampler.num_beams
        column = inputs["token_ids"].shape[1] + state["step"] - 1
        start_columns = ops.repeat(
            _start_columns(inputs["padding_mask"]), beams, axis=0
        )
        return self.model_step(
            state["tokens"][:, None], column, start_columns, state["caches"]
        )

    def _body(self, state, inputs):
        beams = self.sampler.num_beams
        vocabulary = self.backbone.vocabulary_size
        step = state["step"]
        logits, caches = self._decode(state, inputs)
        batch = logits.shape[0] // beams
        log_probs = ops.reshape(
            ops.log_softmax(logits, axis=-1), (batch, beams, vocabulary)
        )
        # A finished beam has one continuation: padding, at no cost.
        finished = ops.where(
            ops.arange(vocabulary) == self.pad_token_id, 0.0, _EXCLUDED
        )
        candidates = ops.where(state["done"][..., None], finished, log_probs)
        candidates = candidates + state["scores"][..., None]
        scores, flat_index = ops.top_k(
            ops.reshape(candidates, (batch, beams * vocabulary)), beams, sorted=True
        )
        flat_index = _int32(flat_index)
        parents = flat_index // vocabulary
        tokens = flat_index % vocabulary

        was_done = ops.take_along_axis(state["done"], parents, axis=1)
        lengths = ops.take_along_axis(state["lengths"], parents, axis=1)
        lengths = lengths + ops.where(was_done, 0, 1)
        width = state["generated"].shape[2]
        sequences = ops.take_along_axis(
            state["generated"],
            ops.repeat(parents[..., None], width, axis=2),
            axis=1,
        )
        zero = ops.zeros((), "int32")
        sequences = ops.slice_update(sequences, [zero, zero, step], tokens[..., None])
        done = ops.logical_or(was_done, _is_stop(tokens, inputs["stop_ids"]))
        done = ops.logical_or(done, step + 1 >= inputs["limits"][:, None])

        rows = ops.reshape(
            ops.arange(batch, dtype="int32")[:, None] * beams + parents, (-1,)
        )
        caches = [tuple(ops.take(tensor, rows, axis=0) for tensor in c) for c in caches]
        state = dict(state)
        state.update(
            step=step + 1,
            tokens=ops.reshape(tokens, (-1,)),
            done=done,
            scores=scores,
            lengths=lengths,
            generated=sequences,
            caches=caches,
        )
        return state

    def result(self, state):
        lengths = ops.cast(ops.maximum(state["lengths"], 1), "float32")
        normalized = state["scores"] / lengths**self.sampler.length_penalty
        best = _int32(ops.argmax(normalized, axis=1))
        width = state["generated"].shape[2]
        chosen = ops.take_along_axis(
            state["generated"],
            ops.repeat(best[:, None, None], width, axis=2),
            axis=1,
        )
        return chosen[:, 0, :]


# -- the engine --------------------------------------------------------------


class DecodeEngine:
    """Generates token ids from right-padded prompts with a compiled loop.

    Args:
        backbone: a `GemmaBackbone`.
        pad_token_id: id emitted by rows that have stopped.

    `GemmaCausalLM` holds one engine (`GemmaCausalLM.decode_engine`); the
    compiled functions live in it, one per sampler configuration and kind of
    call, and JAX and TensorFlow keep one trace per shape bucket inside
    those.

    Example:

    >>> import numpy as np
    >>> from keras_gemma import GemmaBackbone
    >>> backbone = GemmaBackbone(vocabulary_size=40, num_layers=1,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
    ...     intermediate_dim=32, head_dim=8)
    >>> engine = DecodeEngine(backbone)
    >>> rows = engine.generate(np.array([[2, 7, 9], [2, 5, 0]]),
    ...     np.array([[1, 1, 1], [1, 1, 0]]), max_new_tokens=[4, 2])
    >>> [len(row) for row in rows]
    [4, 2]
    """

    def __init__(self, backbone, pad_token_id=0):
        self.backbone = backbone
        self.pad_token_id = int(pad_token_id)
        self.runner = _runner()
        self.trace_count = 0
        self._functions = {}
        self._signature = None
        self._model_step = None
        self._graph_runtime_suffices = False

    def _count_trace(self):
        self.trace_count += 1

    def _compiled(self, key, make_function, donate_state=False, loop_free=False):
        """The compiled function for `key`, made on first use. All are
        dropped when the backbone's variables change (LoRA enabled,
        quantized), since compiled code refers to the variables.
        `loop_free` functions may skip XLA (see `_graph_runtime_suffices`)."""
        signature = tuple(id(variable) for variable in self.backbone.variables)
        if signature != self._signature:
            self._functions.clear()
            self._signature = signature
            self._graph_runtime_suffices = _graph_runtime_suffices(self.backbone)
            self._model_step = self.runner.capture(
                _model_step(self.backbone),
                self.backbone.variables,
                on_trace=self._count_trace,
            )
        if key not in self._functions:
            self._functions[key] = self.runner.compile(
                make_function(),
                self.backbone.variables,
                donate_state=donate_state,
                on_trace=self._count_trace,
                xla=not (loop_free and self._graph_runtime_suffices),
            )
        return self._functions[key]

    def _function(self, kind, sampler, record_logits=False, prompt_tokens=0):
        """The compiled `kind` program of `sampler`; a prefill (`"start"`)
        of `prompt_tokens` (batch times bucketed width) may skip XLA (see
        `_graph_runtime_suffices`)."""
        loop_free = (
            kind == "start" and prompt_tokens <= _GRAPH_RUNTIME_MAX_PROMPT_TOKENS
        )

        def make_function():
            program_class = _BeamProgram if sampler.is_beam_search else _TokenProgram
            program = program_class(
                self.backbone,
                sampler,
                self.runner,
                self.pad_token_id,
                lambda *args: self._model_step(*args),
                record_logits=record_logits,
            )
            return getattr(program, kind)

        return self._compiled(
            (kind, sampler.cache_key(), record_logits, loop_free),
            make_function,
            donate_state=kind == "advance",
            loop_free=loop_free,
        )

    # -- host-side preparation ---------------------------------------------

    def _prepare(self, token_ids, padding_mask, max_new_tokens, stop_token_ids, seed):
        token_ids = np.asarray(token_ids)
        padding_mask = np.asarray(padding_mask).astype(bool)
        if token_ids.ndim != 2 or padding_mask.shape != token_ids.shape:
            raise ValueError(
                "`token_ids` and `padding_mask` must both have shape "
                f"(batch, length); got {token_ids.shape} and {padding_mask.shape}."
            )
        lengths = padding_mask.sum(axis=1)
        columns = np.arange(token_ids.shape[1])[None, :]
        if not np.array_equal(padding_mask, columns < lengths[:, None]):
            raise ValueError(
                "`padding_mask` must be right-padded: ones for the prompt, then zeros."
            )
        if lengths.size and lengths.min() < 1:
            raise ValueError("Every prompt needs at least one token.")
        batch = token_ids.shape[0]
        limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (batch,))
        if limits.size and limits.min() < 0:
            raise ValueError("`max_new_tokens` must not be negative.")
        prompt_width = bucket_length(lengths.max())
        output_width = bucket_length(limits.max())
        left_ids = np.full((batch, prompt_width), self.pad_token_id, np.int32)
        left_mask = np.zeros((batch, prompt_width), np.int32)
        for row, length in enumerate(lengths):
            left_ids[row, prompt_width - length :] = token_ids[row, :length]
            left_mask[row, prompt_width - length :] = 1
        stop_ids = [int(i) for i in (stop_token_ids or ())]
        slots = max(4, len(stop_ids))
        stop_array = np.full((slots,), -1, np.int32)
        stop_array[: len(stop_ids)] = stop_ids
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        seed_array = np.array([seed % (2**31), (seed // 2**31) % (2**31)], np.int32)
        inputs = {
            "token_ids": left_ids,
            "padding_mask": left_mask,
            "limits": limits.astype(np.int32),
            "stop_ids": stop_array,
            "seed": seed_array,
            "num_steps": np.asarray(limits.max(), np.int32),
            "until": np.asarray(limits.max(), np.int32),
            "generated": np.full((batch, output_width), self.pad_token_id, np.int32),
        }
        return inputs, limits, set(stop_ids)

    def _to_tensors(self, inputs):
        return {key: self.runner.to_tensor(value) for key, value in inputs.items()}

    @staticmethod
    def _trim(generated, limits, stop_ids, steps=None):
        """Per-row generated ids: up to the budget, or the first stop token
        (kept), or `steps` tokens."""
        rows = []
        for row, limit in zip(generated, limits):
            row = row[: int(limit) if steps is None else min(int(limit), steps)]
            for index, token in enumerate(row):
                if int(token) in stop_ids:
                    row = row[: index + 1]
                    break
            rows.append(np.array(row, np.int32))
        return rows

    def _check_sampler(self, sampler):
        sampler = samplers_lib.get(sampler)
        if sampler.is_beam_search and sampler.num_beams > self.backbone.vocabulary_size:
            raise ValueError(
                f"`num_beams` ({sampler.num_beams}) must not exceed the vocabulary "
                f"size ({self.backbone.vocabulary_size})."
            )
        return sampler

    # -- public calls --------------------------------------------------------

    def generate(
        self,
        token_ids,
        padding_mask,
        max_new_tokens,
        stop_token_ids=(),
        sampler="greedy",
        seed=None,
        return_logits=False,
    ):
        """Generates for a batch of right-padded prompts.

        Args:
            token_ids: `(batch, length)` prompt ids, right-padded.
            padding_mask: `(batch, length)`, 1 for prompt tokens.
            max_new_tokens: an int or one int per row: the most tokens to
                generate for that row (0 allowed).
            stop_token_ids: ids that end a row (the stop token is kept).
            sampler: a `Sampler` or sampler name.
            seed: int seed for random samplers; `None` draws one.
            return_logits: also return, per row, the float32 logits each
                new token was chosen from, `(new_tokens, vocabulary)` (not
                with beam search).

        Returns:
            A list with one int32 numpy array of new ids per row, and with
            `return_logits` a second list of logits arrays.
        """
        sampler = self._check_sampler(sampler)
        if return_logits and sampler.is_beam_search:
            raise ValueError("`return_logits` is not available with beam search.")
        inputs, limits, stop_ids = self._prepare(
            token_ids, padding_mask, max_new_tokens, stop_token_ids, seed
        )
        if limits.size == 0 or limits.max() == 0:
            rows = [np.zeros((0,), np.int32) for _ in limits]
            if return_logits:
                empty = np.zeros((0, self.backbone.vocabulary_size), np.float32)
                return rows, [empty for _ in limits]
            return rows
        tensors = self._to_tensors(inputs)
        if sampler.is_beam_search:
            generated = self._function("run", sampler)(tensors)
        else:
            # The prefill and the loop are compiled apart, as the two
            # functions `stream` uses: the first token needs only the
            # prefill's program (half or less of the compile time on JAX
            # and TensorFlow), and `stream` compiles nothing after `generate`.
            start = self._function(
                "start",
                sampler,
                record_logits=return_logits,
                prompt_tokens=inputs["token_ids"].size,
            )
            state = start(tensors)
            if limits.max() > 1:
                advance = self._function(
                    "advance", sampler, record_logits=return_logits
                )
                state = advance(state, tensors)
            generated = state["generated"]
        generated = np.asarray(ops.convert_to_numpy(generated))
        rows = self._trim(generated, limits, stop_ids)
        if not return_logits:
            return rows
        logits = np.asarray(ops.convert_to_numpy(state["logits"]))
        return rows, [values[: len(row)] for values, row in zip(logits, rows)]

    def stream(
        self,
        token_ids,
        padding_mask,
        max_new_tokens,
        stop_token_ids=(),
        sampler="greedy",
        seed=None,
        chunk_size=1,
    ):
        """Like `generate`, but yields the new ids produced so far (one list
        of arrays per row) after every `chunk_size` steps.

        The concatenation is the same as `generate`'s result: the same
        compiled step function runs, in pieces.
        """
        sampler = self._check_sampler(sampler)
        if sampler.is_beam_search:
            raise ValueError(
                "`stream` cannot use beam search: beams are reordered until the "
                "end. Use `generate` with a beam sampler."
            )
        inputs, limits, stop_ids = self._prepare(
            token_ids, padding_mask, max_new_tokens, stop_token_ids, seed
        )
        if limits.size == 0 or limits.max() == 0:
            yield [np.zeros((0,), np.int32) for _ in limits]
            return
        start = self._function("start", sampler, prompt_tokens=inputs["token_ids"].size)
        advance = self._function("advance", sampler)
        num_steps = int(limits.max())
        state = start(self._to_tensors(inputs))
        while True:
            # Copy out before the state is donated to the next step.
            generated = np.array(ops.convert_to_numpy(state["generated"]))
            step = int(ops.convert_to_numpy(state["step"]))
            all_done = bool(np.all(ops.convert_to_numpy(state["done"])))
            yield self._trim(generated, limits, stop_ids, steps=step)
            if all_done or step >= num_steps:
                return
            inputs["until"] = np.asarray(min(step + chunk_size, num_steps), np.int32)
            state = advance(state, self._to_tensors(inputs))

    def score(self, token_ids, padding_mask, target_ids=None):
        """Float32 logits `(batch, length, vocabulary)` or, with
        `target_ids`, the per-token cross-entropy `(batch, length)` (0 on
        padding), from one compiled forward pass."""
        backbone = self.backbone

        def logits(inputs):
            hidden = backbone(
                {key: inputs[key] for key in ("token_ids", "padding_mask")}
            )
            return backbone.token_embedding(hidden, reverse=True)

        def loss(inputs):
            losses = keras.losses.sparse_categorical_crossentropy(
                inputs["target_ids"], logits(inputs), from_logits=True
            )
            return losses * ops.cast(inputs["padding_mask"], losses.dtype)

        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        if target_ids is None:
            function = self._compiled(("logits",), lambda: logits)
        else:
            inputs["target_ids"] = target_ids
            function = self._compiled(("loss",), lambda: loss)
        return function(self._to_tensors(inputs))
