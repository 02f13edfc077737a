"""The neural memory's GPU figures in one call: every variant, one JSON file.

    python3 .dev_scripts/gpu_memory_bench.py [--out FILE] [--budget-s 450]
        [--sections gemm branch model numerics latency compiled profile] [--dry-run]

A thin caller of ``convneur_mm.analysis.memory_suite`` (the sections are
``convneur_mm.analysis.memory_sections``'s; ``tools/analysis_tools/benchmark.py
--task memory --sections ...`` runs the same). The JSON goes to ``--out``; it is rewritten after every section,
so a run cut short keeps what it measured. The targets are printed last; the
exit status is non-zero if an item failed. ``--dry-run`` runs what a CPU can
at tiny sizes and checks the set-up and the JSON's schema.
"""
import argparse
import sys
from typing import Optional, Sequence

from convneur_mm.analysis import memory_suite
from convneur_mm.utils.cli import non_negative_float, positive_int


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='the JSON file')
    parser.add_argument('--budget-s', type=non_negative_float, default=None,
                        help=f'seconds the whole run may take (default '
                        f'{memory_suite.DEFAULT_BUDGET_S:.0f}; a dry run: none)')
    parser.add_argument('--sections', nargs='+', choices=memory_suite.SECTIONS,
                        default=list(memory_suite.DEFAULT_SECTIONS),
                        help='default: all but profile')
    parser.add_argument('--dry-run', action='store_true',
                        help='tiny sizes on the CPU; checks the set-up and the JSON schema')
    parser.add_argument('--batch', type=positive_int,
                        help='throughput batch (default 128; dry run 2)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = args.out
    try:
        memory_suite.check_writable(out)
    except OSError as exc:
        print(f'gpu_memory_bench: cannot write {out}: {exc}', file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print('gpu_memory_bench: no CUDA device; on a CPU run it with --dry-run',
                  file=sys.stderr)
            return 2
    code, result = memory_suite.run(out, args.sections, args.dry_run, args.batch, args.budget_s,
                                    list(argv if argv is not None else sys.argv[1:]))
    print(f'[gpu_memory_bench] wrote {out} in {result["elapsed_s"]:.0f} s')
    return code


if __name__ == '__main__':
    sys.exit(main())
