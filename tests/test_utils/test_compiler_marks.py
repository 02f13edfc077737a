import pytest
import torch

from convneur_mm.utils.compiler_marks import DYNAMO_CONSTANT_MARK, assume_constant_result


@pytest.mark.torch_pinned
def test_the_mark_is_the_one_torchs_decorator_sets():
    def ours():
        return 1

    def torchs():
        return 1

    assert assume_constant_result(ours) is ours
    assert torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) == {DYNAMO_CONSTANT_MARK: True}


def test_a_marked_function_is_called_while_tracing_only():
    calls = []

    def flag() -> bool:
        calls.append(1)
        return True

    def f(x):
        return x + 1 if flag() else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(f, backend='eager', fullgraph=True)
    for _ in range(3):
        assert compiled(torch.ones(2)).tolist() == [2.0, 2.0]
    assert len(calls) == 3  # unmarked: traced into the graph, its side effect at every call
    calls.clear()
    assume_constant_result(flag)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend='eager', fullgraph=True)
    for _ in range(3):
        assert compiled(torch.ones(2)).tolist() == [2.0, 2.0]
    assert len(calls) == 1  # marked: its result taken once, while tracing
