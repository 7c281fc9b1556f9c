"""Making a recorded PyTorch decode step cheap to replay.

A decode step recorded with `make_fx` replays every aten operation the
Keras layers issued, and each costs a few microseconds of Python dispatch
however small its tensors: the 270M model's step has about 3,400. Many are
repeats: each layer recomputes the same rotary tables from the same
positions, the same masks, the same constants. `remove_repeated_operations`
keeps the first of identical operations on identical inputs (about one in
eight of the step's nodes; 50 ms per step to 43 ms for the 270M model in
bfloat16 with int8 weights).

Two operations are identical only when their inputs hold the same values
when each runs, so every tensor gets a version, raised by each in-place
operation on it or on a view of it; an operation reading a tensor written in
between is kept. Operations with side effects (in-place ones, random
sampling) are never merged.

`replay_with_torchscript` then runs what is left through TorchScript's
interpreter instead of Python: it dispatches each operation in about a third
of the time (the same step: 44 to 29 ms; float32 70 to 56 ms).
"""

import operator
import warnings

import torch
import torch.utils._pytree as pytree

from keras_gemma.layers import storage_layout


def record_operations(function, *args):
    """`make_fx(function)(*args)`: the aten operations `function` runs on
    `args` (real tensors, run as they are recorded), as a graph module.

    `make_fx` describes each result in its graph with a tensor of a fake
    tensor mode; without one active, it creates a mode per result, and each
    mode records the Python stack it was made from (about 0.8 ms under the
    Keras layers' deep stacks: 3 of the 6 s spent recording the 270M
    model's decode step). One mode, made current by a tracing context,
    serves them all.

    Example:

    >>> import torch
    >>> graph_module = record_operations(torch.sin, torch.zeros(2))
    >>> graph_module(torch.full((2,), torch.pi / 2)).tolist()
    [1.0, 1.0]
    """
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
        return make_fx(function)(*args)


def remove_repeated_operations(graph_module):
    """Drops, in place, every operation of `graph_module` that repeats an
    earlier one on the same inputs, then recompiles it. Returns it.

    Example:

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def step(x):
    ...     return torch.sin(x) + torch.sin(x)
    >>> graph_module = make_fx(step)(torch.ones(3))
    >>> before = len(graph_module.graph.nodes)
    >>> graph_module = remove_repeated_operations(graph_module)
    >>> before - len(graph_module.graph.nodes)
    1
    >>> graph_module(torch.zeros(3)).tolist()
    [0.0, 0.0, 0.0]
    """
    graph = graph_module.graph
    roots = {}  # node -> the tensor whose memory it views (itself if none)
    versions = {}  # root -> in-place writes so far
    first = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            roots[node] = node
            continue
        target = node.target
        roots[node] = _viewed_root(node, roots)
        if _writes_in_place(target):
            for written in _written_inputs(node):
                root = roots.get(written, written)
                versions[root] = versions.get(root, 0) + 1
            continue
        if _has_side_effects(target):
            continue
        key = _key(node, roots, versions)
        if key is None:
            continue
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node
    graph_module.recompile()
    return graph_module


def replay_with_torchscript(graph_module, *example_args, fixed_inputs=0):
    """Returns a function computing `graph_module(*args)` whose operations
    run in TorchScript's interpreter, traced once with `example_args` (the
    graph is recorded for fixed shapes, so nothing depends on them).

    The first `fixed_inputs` tensors of the flattened arguments are ones that
    rarely change between calls (a model's weights): the operations that
    depend on nothing else (casts and offsets of normalization weights,
    reciprocals of scales, views of weights, constants) run once, and again
    only when one of those tensors is replaced or written in place
    (`split_fixed_operations`).

    TorchScript's optimizer merges matrix products that share an operand
    into one product over the concatenated other operands: for the chunks of
    a converted int8 weight, that re-creates the whole converted weight at
    every call (63 to 780 ms per step). Products are traced as
    `aten::matmul`, which the merge does not match and which runs the same
    kernel.

    Example:

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def step(inputs):
    ...     return {"sum": inputs["x"] + inputs["y"], "x": inputs["x"]}
    >>> inputs = {"x": torch.ones(2), "y": torch.full((2,), 2.0)}
    >>> replay = replay_with_torchscript(make_fx(step)(inputs), inputs)
    >>> replay({"x": torch.zeros(2), "y": torch.ones(2)})["sum"].tolist()
    [1.0, 1.0]
    """
    # make_fx flattens nested inputs and outputs in the generated code; the
    # copy has plain code: flat inputs, flat outputs.
    pytree_info = getattr(graph_module.graph._codegen, "pytree_info", None)
    graph = torch.fx.Graph()
    flat_outputs, structure = pytree.tree_flatten(
        graph.graph_copy(graph_module.graph, {})
    )
    graph.output(tuple(flat_outputs))
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.mm.default:
            node.target = torch.ops.aten.matmul.default
    flat_module = torch.fx.GraphModule(graph_module, graph)
    prepare, flat_module = split_fixed_operations(flat_module, fixed_inputs)
    fixed = _FixedResults(prepare, fixed_inputs)
    example_leaves = pytree.tree_leaves(example_args)
    with warnings.catch_warnings():
        # TorchScript is in maintenance mode; its tracer still works and
        # says so.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            flat_module,
            (*example_leaves, *fixed(example_leaves)),
            check_trace=False,
        )

    def replay(*args):
        leaves = pytree.tree_leaves(args)
        results = traced(*leaves, *fixed(leaves))
        outputs = pytree.tree_unflatten(list(results), structure)
        if pytree_info is not None and pytree_info.out_spec is not None:
            outputs = pytree.tree_unflatten(outputs, pytree_info.out_spec)
        return outputs

    return replay


# Results of fixed operations larger than this many elements are left in the
# step (views of the inputs excepted): caching one would keep, for example,
# a float copy of a whole int8 weight in memory.
_MAX_CACHED_ELEMENTS = 1 << 20


def split_fixed_operations(graph_module, fixed_inputs):
    """Splits a graph with flat inputs in two: `prepare`, the operations
    whose inputs are only the first `fixed_inputs` placeholders and
    constants, returning the results the rest uses; and `step`, the rest,
    taking those results as extra inputs after its own. Results are kept
    only if small or views (`_MAX_CACHED_ELEMENTS`); operations writing in
    place or drawing random numbers, and anything reading an input that some
    operation writes, stay in `step`. `graph_module` is changed into `step`.
    Returns `(prepare, step)`.

    Example:

    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def step(weight, x):
    ...     return x * (weight + 1.0)
    >>> recorded = make_fx(step)(torch.ones(2), torch.ones(2))
    >>> prepare, step = split_fixed_operations(recorded, fixed_inputs=1)
    >>> offsets = prepare(torch.full((2,), 2.0))
    >>> offsets[0].tolist()
    [3.0, 3.0]
    >>> step(torch.full((2,), 2.0), torch.full((2,), 0.5), *offsets).tolist()
    [1.5, 1.5]
    """
    graph = graph_module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    roots = {}
    for node in graph.nodes:
        roots[node] = _viewed_root(node, roots)
    written = {
        roots.get(input_node, input_node)
        for node in graph.nodes
        if node.op == "call_function" and _writes_in_place(node.target)
        for input_node in _written_inputs(node)
    }
    fixed = {node for node in placeholders[:fixed_inputs] if node not in written}
    for node in graph.nodes:
        if node.op == "get_attr" and node not in written:
            fixed.add(node)
        elif (
            node.op == "call_function"
            and not _writes_in_place(node.target)
            and not _has_side_effects(node.target)
            and roots[node] not in written
            and all(input_node in fixed for input_node in node.all_input_nodes)
        ):
            fixed.add(node)

    def cacheable(node):
        # A view keeps the tensor it views alive: that one's size counts.
        root = roots[node]
        if node.op != "call_function" or root.op != "call_function":
            return True
        value, viewed = node.meta.get("val"), root.meta.get("val")
        return (
            isinstance(value, torch.Tensor)
            and isinstance(viewed, torch.Tensor)
            and viewed.numel() <= _MAX_CACHED_ELEMENTS
        )

    # Operations whose result is too large to cache go back into the step,
    # which makes their inputs results the step needs, and so on.
    while True:
        needed = _needed_results(graph, fixed)
        too_large = [node for node in needed if not cacheable(node)]
        if not too_large:
            break
        fixed.difference_update(too_large)
    needed = [node for node in needed if node.op == "call_function"]

    prepare_graph = torch.fx.Graph()
    copies = {}
    for node in placeholders[:fixed_inputs]:
        copies[node] = prepare_graph.placeholder(node.name, type_expr=node.type)
    for node in graph.nodes:
        if node in fixed and node.op != "placeholder":
            copies[node] = prepare_graph.node_copy(node, copies.__getitem__)
    prepare_graph.output(tuple(copies[node] for node in needed))
    prepare = torch.fx.GraphModule(graph_module, prepare_graph)

    last_input = placeholders[-1] if placeholders else None
    for index, node in enumerate(needed):
        with graph.inserting_after(last_input):
            last_input = graph.placeholder(f"fixed_{index}")
        last_input.meta = dict(node.meta)
        node.replace_all_uses_with(last_input)
    for node in reversed(list(graph.nodes)):
        if node in fixed and node.op != "placeholder" and not node.users:
            graph.erase_node(node)
    graph_module.recompile()
    return prepare, graph_module


def _viewed_root(node, roots):
    """The node whose memory `node` views (itself if it is no view), given
    `roots`, those of the nodes before it."""
    inputs = node.all_input_nodes
    if node.op != "call_function" or not inputs or not _is_view(node.target):
        return node
    return roots.get(inputs[0], inputs[0])


def _needed_results(graph, fixed):
    """The nodes of `fixed` that a node outside it uses, in graph order."""
    needed = {
        input_node
        for node in graph.nodes
        if node not in fixed
        for input_node in node.all_input_nodes
        if input_node in fixed
    }
    return [node for node in graph.nodes if node in needed]


class _FixedResults:
    """`prepare`'s results for the fixed inputs, recomputed only when one of
    them is another tensor or was written in place since (its version)."""

    def __init__(self, prepare, fixed_inputs):
        self.prepare = prepare
        self.fixed_inputs = fixed_inputs
        self.inputs = None
        self.versions = None
        self.results = ()

    def __call__(self, leaves):
        # Without fixed inputs, `prepare` still computes what depends on
        # constants alone, once.
        inputs = leaves[: self.fixed_inputs]
        # `None` (no count kept) reruns every call.
        versions = [storage_layout.torch_write_count(tensor) for tensor in inputs]
        if (
            self.inputs is None
            or None in versions
            or versions != self.versions
            or any(a is not b for a, b in zip(inputs, self.inputs))
        ):
            self.results = tuple(self.prepare(*inputs))
            self.inputs, self.versions = list(inputs), versions
        return self.results


def _key(node, roots, versions):
    def freeze(value):
        if isinstance(value, torch.fx.Node):
            root = roots.get(value, value)
            return ("node", value, versions.get(root, 0))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__,) + tuple(freeze(item) for item in value)
        if isinstance(value, dict):
            return ("dict",) + tuple((k, freeze(v)) for k, v in sorted(value.items()))
        if isinstance(value, (bool, int, float, str, type(None))):
            # 1 and 1.0 (and True) are equal in a dict but differ for aten.
            return (type(value).__name__, value)
        if isinstance(value, (torch.dtype, torch.device, torch.layout)):
            return (type(value).__name__, str(value))
        if isinstance(value, torch.memory_format):
            return ("memory_format", str(value))
        raise TypeError  # something not compared by value

    try:
        return (node.target, freeze(node.args), freeze(node.kwargs))
    except TypeError:
        return None


def _schema(target):
    return getattr(target, "_schema", None)


def _is_view(target):
    if target is operator.getitem:
        return True
    schema = _schema(target)
    if schema is None:
        return False
    return any(ret.alias_info is not None for ret in schema.returns) or (
        schema.name == "aten::_unsafe_view"
    )


def _writes_in_place(target):
    schema = _schema(target)
    return schema is not None and schema.is_mutable


def _written_inputs(node):
    """The input nodes an in-place operation writes (`self`, `out=`...)."""
    for position, argument in enumerate(node.target._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        if position < len(node.args):
            value = node.args[position]
        else:
            value = node.kwargs.get(argument.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        yield from (item for item in values if isinstance(item, torch.fx.Node))


def _has_side_effects(target):
    if target is operator.getitem:
        return False
    if _schema(target) is None:
        return True  # not an aten operation: unknown
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())
