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
        viewed = node.all_input_nodes[:1] if _is_view(target) else ()
        roots[node] = roots.get(viewed[0], viewed[0]) if viewed else node
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


def replay_with_torchscript(graph_module, *example_args):
    """Returns a function computing `graph_module(*args)` whose operations
    run in TorchScript's interpreter, traced once with `example_args` (the
    graph is recorded for fixed shapes, so nothing depends on them).

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
    with warnings.catch_warnings():
        # TorchScript is in maintenance mode; its tracer still works and
        # says so.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            flat_module, tuple(pytree.tree_leaves(example_args)), check_trace=False
        )

    def replay(*args):
        results = traced(*pytree.tree_leaves(args))
        outputs = pytree.tree_unflatten(list(results), structure)
        if pytree_info is not None and pytree_info.out_spec is not None:
            outputs = pytree.tree_unflatten(outputs, pytree_info.out_spec)
        return outputs

    return replay


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
