"""Repeated operations dropped from a recorded PyTorch step, without merging
reads that an in-place write separates; the step replayed through
TorchScript."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from keras_gemma.generation import torch_graph
from keras_gemma.generation.torch_graph import (
    record_operations,
    remove_repeated_operations,
    replay_with_torchscript,
)


def _count(graph_module, target):
    return sum(node.target == target for node in graph_module.graph.nodes)


def _recorded(step, *args):
    return record_operations(step, *args)


def test_recording_describes_every_result_with_one_fake_tensor_mode(monkeypatch):
    modes = []
    make_mode = FakeTensorMode.__init__

    def counted(self, *args, **kwargs):
        modes.append(self)
        make_mode(self, *args, **kwargs)

    monkeypatch.setattr(FakeTensorMode, "__init__", counted)

    def step(x):
        for _ in range(10):
            x = torch.sin(x) * 2.0
        return x.sum(dim=0)

    recorded = record_operations(step, torch.ones(3, 2))

    assert len(modes) == 1  # make_fx alone makes one per result (22 here)
    shapes = [
        tuple(node.meta["val"].shape)
        for node in recorded.graph.nodes
        if node.op == "call_function"
    ]
    assert shapes == [(3, 2)] * 20 + [(2,)]
    x = torch.randn(3, 2)
    torch.testing.assert_close(recorded(x), step(x))


def test_repeated_operations_are_computed_once_with_the_same_results():
    def step(x, positions):
        tables = [torch.cos(positions.float() * 0.5) for _ in range(4)]
        return sum(x * table for table in tables)

    x, positions = torch.randn(5), torch.arange(5)
    recorded = _recorded(step, x, positions)
    expected = recorded(x, positions)
    assert _count(recorded, torch.ops.aten.cos.default) == 4

    remove_repeated_operations(recorded)

    assert _count(recorded, torch.ops.aten.cos.default) == 1
    # then the four products of x with the one table: one left
    assert _count(recorded, torch.ops.aten.mul.Tensor) == 2
    torch.testing.assert_close(recorded(x, positions), expected)


def test_reads_around_an_in_place_write_are_both_kept():
    def step(cache, update):
        before = cache.sum()
        cache.view(-1)[:2].copy_(update)  # written through a view
        after = cache.sum()
        again = cache.sum()
        return before, after, again

    recorded = _recorded(step, torch.zeros(2, 2), torch.ones(2))
    remove_repeated_operations(recorded)

    assert _count(recorded, torch.ops.aten.sum.default) == 2  # `again` merged
    cache = torch.zeros(2, 2)
    before, after, again = recorded(cache, torch.ones(2))
    assert (before.item(), after.item(), again.item()) == (0.0, 2.0, 2.0)
    assert cache.sum().item() == 2.0


def test_a_write_through_out_is_seen_by_later_reads():
    def step(x, out):
        flat = out.view(-1)
        before = flat.sum()
        torch.add(x, x, out=out)  # `out` is not the first argument
        after = flat.sum()
        return before, after

    recorded = _recorded(step, torch.ones(3), torch.zeros(3))
    remove_repeated_operations(recorded)

    before, after = recorded(torch.ones(3), torch.zeros(3))
    assert (before.item(), after.item()) == (0.0, 6.0)


def test_random_operations_are_never_merged():
    def step(x):
        return torch.rand(3) + torch.rand(3) + x

    recorded = _recorded(step, torch.zeros(3))
    remove_repeated_operations(recorded)

    assert _count(recorded, torch.ops.aten.rand.default) == 2


def test_equal_numbers_of_different_types_are_not_confused():
    def step(counts):
        return counts * 2, counts * 2.0  # 2 == 2.0, but int64 against float32

    recorded = _recorded(step, torch.arange(3))
    remove_repeated_operations(recorded)

    integer, floating = recorded(torch.arange(3))
    assert integer.dtype == torch.int64 and floating.dtype == torch.float32


def test_torchscript_replay_matches_the_recording_and_writes_in_place():
    def step(inputs, cache, position):
        cache.index_copy_(0, position, inputs["x"][None])
        return {"totals": [cache.sum(0) * inputs["scale"]], "cache": cache}

    def arguments(seed):
        generator = torch.Generator().manual_seed(seed)
        inputs = {"x": torch.randn(3, generator=generator), "scale": torch.tensor(2.0)}
        return inputs, torch.zeros(4, 3), torch.tensor([seed % 4])

    recorded = _recorded(step, *arguments(0))
    replay = replay_with_torchscript(recorded, *arguments(0))
    for seed in range(1, 4):  # TorchScript optimizes after its first runs
        expected_args, replay_args = arguments(seed), arguments(seed)
        expected = recorded(*expected_args)
        result = replay(*replay_args)
        torch.testing.assert_close(result["totals"][0], expected["totals"][0])
        # the cache passed in is the one written, and the one returned
        assert result["cache"] is replay_args[1]
        torch.testing.assert_close(replay_args[1], expected_args[1])
        assert replay_args[1][seed % 4].abs().sum() > 0


def test_torchscript_replay_keeps_products_sharing_an_operand_apart():
    # An int8 weight converted and multiplied in chunks, as PyTorch's int8
    # products of float32 rows are: TorchScript's optimizer merges eight or
    # more such products into one over the whole converted weight.
    def step(rows, weight):
        chunks = [weight[start : start + 4].float() for start in range(0, 32, 4)]
        return torch.cat([rows @ chunk.T for chunk in chunks], dim=-1)

    rows = torch.randn(1, 8)
    weight = torch.randint(-127, 128, (32, 8), dtype=torch.int8)
    replay = replay_with_torchscript(_recorded(step, rows, weight), rows, weight)
    for _ in range(3):
        result = replay(rows, weight)

    optimized = str(torch.jit.last_executed_optimized_graph())
    assert "MMBatchSide" not in optimized
    assert optimized.count("aten::matmul") == 8
    torch.testing.assert_close(result, rows @ weight.float().T)


def _weights_step(weight, codes, x):
    # `weight + 1.0` depends on the weights only; `codes.float()` too, but
    # is larger than worth keeping; `x` changes every call.
    return x * (weight + 1.0) + (codes.float() * x[0]).sum()


def _weights_args():
    return torch.randn(3), torch.ones(1 << 20 | 1, dtype=torch.int8), torch.randn(3)


def test_operations_on_the_weights_alone_move_out_of_the_step():
    args = _weights_args()
    recorded = _recorded(_weights_step, *args)
    expected = recorded(*args)

    prepare, step = torch_graph.split_fixed_operations(recorded, fixed_inputs=2)

    assert _count(prepare, torch.ops.aten.add.Tensor) == 1
    assert _count(step, torch.ops.aten.add.Tensor) == 1  # the one with x
    # the float copy of `codes` would be 4 MiB kept between calls
    assert _count(prepare, torch.ops.aten._to_copy.default) == 0
    assert _count(step, torch.ops.aten._to_copy.default) == 1
    fixed = prepare(*args[:2])
    torch.testing.assert_close(step(*args, *fixed), expected)


def test_fixed_results_are_reused_until_a_weight_changes(monkeypatch):
    calls = []
    split = torch_graph.split_fixed_operations

    def counting_split(graph_module, fixed_inputs):
        prepare, step = split(graph_module, fixed_inputs)

        def counted(*inputs):
            calls.append(len(inputs))
            return prepare(*inputs)

        return counted, step

    monkeypatch.setattr(torch_graph, "split_fixed_operations", counting_split)
    weight, codes, x = _weights_args()
    recorded = _recorded(_weights_step, weight, codes, x)
    replay = replay_with_torchscript(recorded, weight, codes, x, fixed_inputs=2)

    for _ in range(3):
        torch.testing.assert_close(
            replay(weight, codes, x), _weights_step(weight, codes, x)
        )
    assert calls == [2]  # once, for tracing and the three calls

    weight.mul_(2.0)  # written in place: its version changes
    torch.testing.assert_close(
        replay(weight, codes, x), _weights_step(weight, codes, x)
    )
    other = torch.randn(3)  # another tensor
    torch.testing.assert_close(replay(other, codes, x), _weights_step(other, codes, x))
    assert calls == [2, 2, 2]


def test_replay_without_fixed_inputs_computes_operations_on_constants():
    """Operations on the recording's constants alone move out of the step
    even with no fixed inputs; the replay still computes them."""
    table = torch.arange(4.0)

    def step(x):
        return x * torch.cos(table)

    x = torch.ones(4)
    recorded = record_operations(step, x)
    assert _count(recorded, torch.ops.aten.cos.default) == 1
    replay = replay_with_torchscript(recorded, x)
    for scale in (1.0, 3.0):
        torch.testing.assert_close(replay(x * scale), step(x * scale))
