"""The lab's one door: every measurement of fixed subjects, one case per call.

    python -m benchmarks.run CASE [--dry-run] [--json PATH] [the case's options]
    python -m benchmarks.run CASE --help       # the case's options (without CASE: the cases)

Run it from the repository root: the lab is not installed with the package.
Every case prints its report; ``--json`` writes its record there
(``common.record``: the case, its command line and its result; a case that
measures for minutes rewrites it as it goes). ``--dry-run`` runs a case at
tiny sizes on the CPU: a check of the set-up, not a measurement. The exit
status is the case's (1 where a measurement failed or disagrees), 2 for
options that do not fit. benchmarks/README.md says what each case measures;
the figures are in docs/notes/benchmarks.md.
"""
import argparse
import importlib
import sys
from typing import Dict, List, NamedTuple, Optional

from benchmarks.common.record import Record, UsageError
from convneur_mm.utils.cli import writable_file


class Case(NamedTuple):
    """One measurement: what it measures, and the module whose functions
    add its options and run it (imported when the case runs)."""
    summary: str
    module: str
    add_arguments: str = 'add_arguments'
    run: str = 'run_from_args'


CASES: Dict[str, Case] = {
    'memory': Case('the neural memory on the GPU: GEMMs, branches, M3 against local-only, '
                   'numerics, latency, compiled, kernel profile (--sections)',
                   'benchmarks.memory.suite'),
    'memory-paths': Case('one memory: the closed form against the autograd reference and '
                         'titans-pytorch, with the GEMM bound', 'benchmarks.memory.paths',
                         'add_paths_arguments', 'run_paths'),
    'memory-backbone': Case('a backbone\'s inference peak memory and throughput against '
                            'local-only and an older checkout (CPU)', 'benchmarks.memory.paths',
                            'add_backbone_arguments', 'run_backbone'),
    'bytes': Case('bytes of the memory\'s training step: autograd, closed form, Triton '
                  'operators, whole branches (meta count)', 'benchmarks.memory.bytes'),
    'ops': Case('ATen ops, bytes moved and held of a global branch or backbone (--before PATH)',
                'benchmarks.memory.bytes', 'add_ops_arguments', 'run_ops'),
    'rooflines': Case('the memory kernels\' bytes, FLOPs and roofline at a model\'s shapes '
                      '(no GPU)', 'benchmarks.kernels.profile'),
    'launch': Case('one memory kernel\'s call once, inside the CUDA profiler\'s range, against '
                   'the PyTorch path: what ncu and compute-sanitizer watch',
                   'benchmarks.kernels.one_launch'),
    'aot': Case('the memory kernels compiled ahead of time for a GPU (no GPU needed): registers, '
                'spills, shared memory, matrix products and those computed twice',
                'benchmarks.kernels.aot'),
    'repro': Case('a minimal kernel standing for the read\'s backward rows pass at 64-row '
                  'tiles: each launch variant against float64, a process each',
                  'benchmarks.kernels.repro'),
    'gpu': Case('the GPU run: correctness, Nsight Compute, compute-sanitizer, tuning, then the '
                'figures, a process per step, saved as it goes and resumable',
                'benchmarks.gpu.session'),
    'tune': Case('the memory kernels\' launch options chosen by timing, beside the PyTorch path',
                 'benchmarks.kernels.tune'),
    'train': Case('training and evaluation iterations of the real configs beside their peers',
                  'benchmarks.training.throughput'),
    'precision': Case('16-bit against float32 training from the same seeds: loss and top-1',
                      'benchmarks.training.precision'),
    'seeds': Case('a demo\'s first epochs from each seed, per variant (autograd, closed form, '
                  'local-only): losses, first non-finite iteration, the hook\'s stop; '
                  '--plot: gradient norms per module group', 'benchmarks.training.seeds'),
    'compile': Case('eager against torch.compile: inference, backbone and detector training '
                    'steps', 'benchmarks.training.compiled', 'add_compile_arguments',
                    'run_compile'),
    'onnx': Case('batch-1 latency of eager, compiled and ONNX Runtime (CPU)',
                 'benchmarks.training.compiled', 'add_onnx_arguments', 'run_onnx'),
    'resolution': Case('backbone time and peak memory against input size, with a figure',
                       'benchmarks.paper.resolution'),
    'table5': Case('trains and evaluates the paper\'s Table 5 rows under one recipe',
                   'benchmarks.paper.table5'),
}


def case_list() -> str:
    """The cases, one line each."""
    width = max(map(len, CASES))
    return '\n'.join(f'  {name:{width}s}  {case.summary}' for name, case in CASES.items())


def build_parser(case: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``case``'s options (without a case: the common ones)."""
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.run', description=__doc__ if case is None else
        f'{case}: {CASES[case].summary}', epilog=None if case else 'cases:\n' + case_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('case', choices=list(CASES), metavar='CASE', help='see the list below')
    parser.add_argument('--dry-run', action='store_true', help='tiny sizes on the CPU: a check')
    parser.add_argument('--json', type=writable_file, metavar='PATH',
                        help='also write the record here (checked at start)')
    if case is not None:
        spec = CASES[case]
        getattr(importlib.import_module(spec.module), spec.add_arguments)(
            parser.add_argument_group(f'{case} options'))
    return parser


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The case first, then its options."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument('case', nargs='?')
    known, _ = first.parse_known_args(argv)
    return build_parser(known.case if known.case in CASES else None).parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run one case; its result, as written to ``--json``.

    Args:
        argv: the command line after ``python -m benchmarks.run`` (default: sys.argv's).
    """
    from convneur_mm.utils.third_party_warnings import silence_known_third_party_warnings
    silence_known_third_party_warnings()  # the stack's known noise, not ours to act on
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    parser = build_parser(args.case)
    record = Record(args.json, args.case, argv)
    spec = CASES[args.case]
    try:
        result = getattr(importlib.import_module(spec.module), spec.run)(args, record)
    except UsageError as exc:
        parser.error(str(exc))
    record.write(result)
    if result.get('exit_code'):
        raise SystemExit(result['exit_code'])
    return result


if __name__ == '__main__':
    main()
