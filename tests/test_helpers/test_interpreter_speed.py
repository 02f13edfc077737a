"""tests.interpreter_speed: the interpreter without its repeated
set-up and its overflow check computes what it computes with them (CPU)."""
import pytest

from ..interpreted import run_script

# nested device functions (one through the standard library's tl.zeros, which
# needs tl.core patched), a product, erf and masks; a launch that fails inside
# the block; the same launches before, inside and after it
SCRIPT = r'''
import json
import torch, triton, triton.language as tl
from triton.runtime import interpreter
from tests.interpreter_speed import _interpreter_internals, lean_interpreter

@triton.jit
def _inner(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

@triton.jit
def _middle(x, w, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    return _inner(tl.dot(x, w, acc=acc, input_precision='ieee'))

@triton.jit
def kernel(x_ptr, w_ptr, out_ptr, m, n, FAIL: tl.constexpr, BLOCK: tl.constexpr):
    tl.static_assert(FAIL == 0)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + cols[:, None] * n + cols[None, :],
                mask=(cols < n)[:, None] & (cols < n)[None, :], other=0.0)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], _middle(x, w, BLOCK), mask=mask)

@triton.jit
def wrapping(out_ptr, big):
    tl.store(out_ptr, big * 4)  # an int32 argument of 2**30: wraps to 0

def wrapped():
    out = torch.ones(1, dtype=torch.int32)
    wrapping[(1, )](out, 2 ** 30)
    return out.item()

gen = torch.Generator().manual_seed(0)
x, w = torch.randn(40, 20, generator=gen), torch.randn(20, 20, generator=gen)

def run():
    out = torch.zeros(40, 20)
    kernel[(2, )](x, w, out, 40, 20, FAIL=0, BLOCK=32)
    return out

calls = [0]
real = interpreter._patch_lang
def counting(fn):
    calls[0] += 1
    return real(fn)
interpreter._patch_lang = counting
originals = (interpreter._get_np_dtype, interpreter.GridExecutor.__call__,
             interpreter.interpreter_builder.options)

# the lean block first: the plain interpreter's device calls leave tl.core patched
with lean_interpreter():
    inside = run()
    lean_calls = calls[0]
    try:
        kernel[(1, )](x, w, torch.zeros(40, 20), 40, 20, FAIL=1, BLOCK=32)
        failed = False
    except Exception:
        failed = True
    again = run()
    lean_wrapped = wrapped()
restored = interpreter._patch_lang is counting and originals == (
    interpreter._get_np_dtype, interpreter.GridExecutor.__call__,
    interpreter.interpreter_builder.options)
calls[0] = 0
plain = run()
plain_calls = calls[0]
plain_wrapped = wrapped()
print(json.dumps(dict(
    lean_wrapped=lean_wrapped, plain_wrapped=plain_wrapped,
    internals=_interpreter_internals() is not None,
    inside=torch.equal(plain, inside), again=torch.equal(plain, again),
    plain_calls=plain_calls, lean_calls=lean_calls, failed=failed, restored=restored,
    reference=(plain - torch.nn.functional.gelu(x @ w)).abs().max().item())))
'''


def test_the_lean_interpreter_computes_the_same_with_fewer_set_ups():
    result = run_script(SCRIPT)
    if not result['internals']:
        pytest.skip('this triton lacks the interpreter internals lean_interpreter relies on')
    assert result['reference'] < 1e-4  # the kernel computes gelu(x @ w)
    assert result['inside'] and result['again'], result
    # the plain interpreter patches at the launch and at each device call of
    # each of the 2 programs; the lean one at the launch, and once for tl.core
    assert result['plain_calls'] >= 1 + 2 * 2 and result['lean_calls'] <= 2, result
    assert result['failed'] and result['restored'], result
    # without the overflow check an int32 product wraps as it did with it
    assert result['plain_wrapped'] == result['lean_wrapped'] == 0, result
