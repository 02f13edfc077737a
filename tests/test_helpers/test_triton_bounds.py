"""tests.triton_bounds: the interpreter's accesses checked (CPU)."""
from ..interpreted import run_script

# a copy kernel whose mask lets one element past the end through where asked
SCRIPT = r'''
import json, sys
import torch, triton, triton.language as tl
from tests.triton_bounds import checked_accesses

@triton.jit
def copy(src, dst, n, SLACK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(dst + i, tl.load(src + i, mask=i < n + SLACK), mask=i < n)

src, dst = torch.arange(10.0), torch.zeros(10)
found = {}
with checked_accesses():
    for slack in (0, 1):
        try:
            copy[(1, )](src, dst, 10, SLACK=slack, BLOCK=16)
            found[slack] = 'ok'
        except Exception as exc:
            found[slack] = str(exc)
copy[(1, )](src, dst, 10, SLACK=1, BLOCK=16)  # unchecked again past the block
print(json.dumps(dict(found=found, copied=dst.tolist() == src.tolist())))
'''


def test_a_load_past_its_tensor_is_caught_and_the_check_ends_with_its_block():
    result = run_script(SCRIPT)
    assert result['found']['0'] == 'ok' and result['copied']
    assert 'copy: a load of 1 element(s) outside every tensor' in result['found']['1']
