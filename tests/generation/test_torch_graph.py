"""Repeated operations dropped from a recorded PyTorch step, without merging
reads that an in-place write separates."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from keras_gemma.generation.torch_graph import remove_repeated_operations


def _count(graph_module, target):
    return sum(node.target == target for node in graph_module.graph.nodes)


def _recorded(step, *args):
    return make_fx(step)(*args)


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
