"""A minimal stand-in for the read's backward rows pass at 64-row tiles on
sm_90, to tell a Triton miscompilation from a fault of ours, and to hand
upstream as a reproduction.

``chained_dot_kernel`` keeps the pass's query-gradient loop and nothing
else: per block of hidden units, ``pre = x w1`` and ``back = dy w2^T`` (two
products whose results feed a third, so Triton lays their warps out for a
chained product), ``d_pre = back * gelu'(pre)``, then ``gx += d_pre w1^T``
with ``d_pre`` as a register operand. At 64 rows and 8 warps it compiles for
sm_90 to the pass's matrix layouts (a test holds the two side by side); at
32 rows it leaves ``wgmma`` for ``mma.sync``, as the pass does.

    python -m benchmarks.run repro                      # every variant, a process each
    python -m benchmarks.run repro --rows 64 --warps 8 --stages 2  # one, here
    TRITON_INTERPRET=1 python -m benchmarks.run repro --dry-run

Each variant launches ``REPEATS`` times (a fault of this family can be
intermittent), each output compared with float64 on the same 16-bit inputs,
row by row. A variant that faults (an illegal memory access, a process
killed by a signal), hangs or disagrees is a finding, printed and recorded
as it ends; the exit status is 1 only where a variant could not run for
another reason (a compile error).
"""
import argparse
import math
import os
import subprocess
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from benchmarks.common.record import Record, UsageError
from convneur_mm.models.layers.memory_ops.kernels.availability import interpreter_requested
from convneur_mm.utils.cli import positive_int


@triton.jit
def chained_dot_kernel(x_ptr, dy_ptr, w1_ptr, w2_ptr, gx_ptr, N,
                       D: tl.constexpr, HID: tl.constexpr, BM: tl.constexpr,
                       BH: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, D)
    hcols = tl.arange(0, BH)
    mask = (rows < N)[:, None]
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    gx = tl.zeros([BM, D], dtype=tl.float32)
    for h0 in range(0, HID, BH):
        hid = h0 + hcols
        w1 = tl.load(w1_ptr + cols[:, None] * HID + hid[None, :])  # (D, BH)
        w2t = tl.load(w2_ptr + hid[None, :] * D + cols[:, None])  # (D, BH), w2 (HID, D)
        pre = tl.dot(x, w1)
        back = tl.dot(dy, w2t)
        cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        d_pre = back * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)
        w1t = tl.load(w1_ptr + hid[:, None] + cols[None, :] * HID)  # (BH, D)
        gx += tl.dot(d_pre.to(x.dtype), w1t)
    tl.store(gx_ptr + rows[:, None] * D + cols[None, :], gx, mask=mask)


class Variant(NamedTuple):
    """One launch configuration: the tile's rows, warps and pipeline stages."""
    rows: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return f'{self.rows} rows, {self.warps} warps, {self.stages} stages'


# the pass's default at 64 rows, the options the GPU tried there, and the
# row counts it passes at (32 rows and fewer leave wgmma)
VARIANTS = (Variant(64, 8, 2), Variant(64, 8, 1), Variant(64, 4, 2), Variant(32, 8, 2),
            Variant(16, 8, 2))
# M3's stage 1 read: C_m 128, 4 C_m hidden units in blocks of 32, a chunk's 196 rows x 64
D, HIDDEN, BLOCK_HIDDEN, TOKENS = 128, 512, 32, 196 * 64
DRY_HIDDEN, DRY_TOKENS = 64, 80
# the worst row's error against float64, relative to a row's typical norm: bf16
# rounding of d_pre gives 2.6e-3 at full size; x w1 5% off in one tile, 1.9e-2
TOLERANCE = 1e-2
REPEATS = 20
CHILD_TIMEOUT_S = 25  # a variant compiles and runs in seconds; past this it hangs
# what a child's output says when the launch broke the CUDA context
FAULT_MARKERS = ('illegal memory access', 'misaligned address', 'illegal instruction',
                 'unspecified launch failure')


def inputs(tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> List[torch.Tensor]:
    """x, dy (tokens, D) of unit variance, w1 (D, hidden) and w2 (hidden, D)
    of variance 1 / D, on the CPU: ``pre`` and ``back`` of order one, where
    GELU's derivative varies (a wrong ``pre`` shows in the result)."""
    gen = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(tokens, D, generator=gen) for _ in range(2))
    w1 = torch.randn(D, hidden, generator=gen) / math.sqrt(D)
    w2 = torch.randn(hidden, D, generator=gen) / math.sqrt(D)
    return [t.to(dtype) for t in (x, dy, w1, w2)]


def reference(x, dy, w1, w2) -> torch.Tensor:
    """gx in float64, from the same 16-bit inputs."""
    x, dy, w1, w2 = (t.double() for t in (x, dy, w1, w2))
    pre = x @ w1
    gelu_grad = 0.5 * (1 + torch.erf(pre / math.sqrt(2))) + pre * torch.exp(
        -0.5 * pre * pre) / math.sqrt(2 * math.pi)
    return ((dy @ w2.T) * gelu_grad) @ w1.T


def row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The worst row's distance from ``want`` over a row's root-mean-square
    norm: NaN where a row holds a NaN (or was left unwritten)."""
    rows = (got.double().cpu() - want).norm(dim=1)
    worst = math.nan if bool(rows.isnan().any()) else rows.max().item()
    return worst / (want.norm() / math.sqrt(want.shape[0])).item()


def run_variant(variant: Variant, device, dtype: torch.dtype = torch.bfloat16,
                tokens: int = TOKENS, hidden: int = HIDDEN, repeats: int = REPEATS) -> Dict:
    """``variant``'s gx, launched ``repeats`` times, against float64 computed
    on the CPU before any launch (a stray write cannot reach it): the worst
    launch's ``row_error`` and whether it agrees."""
    host = inputs(tokens, hidden, dtype)
    want = reference(*host)
    x, dy, w1, w2 = (t.to(device) for t in host)
    errors = []
    for _ in range(repeats):
        gx = torch.full((tokens, D), math.nan, device=device)  # a skipped tile stays NaN
        chained_dot_kernel[(triton.cdiv(tokens, variant.rows), )](
            x, dy, w1, w2, gx, tokens, D=D, HID=hidden, BM=variant.rows, BH=BLOCK_HIDDEN,
            num_warps=variant.warps, num_stages=variant.stages)
        errors.append(row_error(gx, want))  # synchronizes: a fault surfaces at its launch
    error = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    return dict(variant=variant._asdict(), error=error, launches=repeats, agrees=_agrees(error))


def _agrees(error: float) -> bool:
    return not math.isnan(error) and error <= TOLERANCE


def verdict(entry: Dict) -> str:
    """'agrees', 'wrong', 'hang' (past ``CHILD_TIMEOUT_S``), 'fault' (a
    launch that broke the CUDA context, or a process killed by a signal) or
    'failed' (it could not run: a compile error)."""
    if entry.get('agrees') is not None:
        return 'agrees' if entry['agrees'] else 'wrong'
    if entry.get('timed_out'):
        return 'hang'
    output = entry.get('output', '').lower()
    if entry.get('exit_status', 0) < 0 or any(m in output for m in FAULT_MARKERS):
        return 'fault'
    return 'failed'


def _child_argv(variant: Variant, dry_run: bool) -> List[str]:
    argv = [sys.executable, '-m', 'benchmarks.run', 'repro', '--rows', str(variant.rows),
            '--warps', str(variant.warps), '--stages', str(variant.stages)]
    return argv + (['--dry-run'] if dry_run else [])


def _parse_child(done: subprocess.CompletedProcess) -> Dict:
    """A child's result from its last ``[repro] ... error E`` line, else its output."""
    for line in reversed(done.stdout.splitlines()):
        if line.startswith('[repro] ') and ' error ' in line:
            error = float(line.rsplit(' error ', 1)[1].split()[0])
            return dict(error=error, agrees=_agrees(error))
    return dict(agrees=None, exit_status=done.returncode,
                output=(done.stdout + done.stderr)[-2000:])


def run_all(variants: Sequence[Variant], dry_run: bool, timeout_s: float = CHILD_TIMEOUT_S,
            on_entry: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Each variant in a process of its own: a fault there breaks its CUDA
    context, not the next variant's. ``on_entry`` gets the entries so far
    after each (the record, written as it goes)."""
    entries: List[Dict] = []
    for variant in variants:
        try:
            done = subprocess.run(_child_argv(variant, dry_run), capture_output=True,
                                  text=True, timeout=timeout_s, env=dict(os.environ))
            entry = dict(variant=variant._asdict(), **_parse_child(done))
        except subprocess.TimeoutExpired:
            entry = dict(variant=variant._asdict(), agrees=None, timed_out=True,
                         output=f'timed out after {timeout_s:.0f} s')
        entry['verdict'] = verdict(entry)
        print(f'[repro] {variant}: {entry["verdict"]}'
              + (f' (error {entry["error"]:.2e})' if 'error' in entry else ''), flush=True)
        entries.append(entry)
        if on_entry is not None:
            on_entry(entries)
    return entries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``repro`` case's options: one variant (all three given) or all."""
    parser.add_argument('--rows', type=positive_int, help="the tile's rows (BM)")
    parser.add_argument('--warps', type=positive_int)
    parser.add_argument('--stages', type=positive_int)


def run_from_args(args: argparse.Namespace, record: Record) -> Dict:
    """One variant in this process, or every ``VARIANTS`` in a child each. A
    dry run is Triton's interpreter on the CPU, float16, at a small size."""
    chosen = [args.rows, args.warps, args.stages]
    if any(v is not None for v in chosen) and None in chosen:
        raise UsageError('--rows, --warps and --stages go together (or none, for every variant)')
    interpreted = interpreter_requested()
    if args.dry_run and not interpreted:
        raise UsageError('a dry run of repro runs the kernel in Triton\'s interpreter: start it '
                         'with TRITON_INTERPRET=1 in the environment')
    if not args.dry_run and not torch.cuda.is_available():
        raise UsageError('repro runs on a CUDA GPU (--dry-run: the interpreter on the CPU)')
    if None not in chosen:
        variant = Variant(*chosen)
        if args.dry_run:
            result = run_variant(variant, 'cpu', torch.float16, DRY_TOKENS, DRY_HIDDEN,
                                 repeats=2)
        else:
            result = run_variant(variant, 'cuda')
        print(f'[repro] {variant}: error {result["error"]:.3e}')
        return result
    entries = run_all(VARIANTS, args.dry_run,
                      on_entry=lambda done: record.write(dict(variants=done)))
    failed = [e for e in entries if e['verdict'] == 'failed']
    return dict(variants=entries, exit_code=1 if failed else 0)


def products(variant: Variant, arch: int = 90) -> List:
    """The kernel's matrix products and their layouts compiled for
    sm_``arch`` at ``variant``, bf16 (``inspect.products``; no GPU needed)."""
    from benchmarks.kernels.inspect import products
    signature = dict(x_ptr='*bf16', dy_ptr='*bf16', w1_ptr='*bf16', w2_ptr='*bf16',
                     gx_ptr='*fp32', N='i32', D='constexpr', HID='constexpr', BM='constexpr',
                     BH='constexpr')
    constants = dict(D=D, HID=HIDDEN, BM=variant.rows, BH=BLOCK_HIDDEN)
    return products(arch, chained_dot_kernel, signature, constants,
                    options=dict(num_warps=variant.warps, num_stages=variant.stages))
