"""The CUDA architecture lists of the installer: torch's, the default
``TORCH_CUDA_ARCH_LIST`` for mmcv's build, and which GPUs a list serves.

Arch lists come in two spellings: torch's (``sm_90``, ``compute_90``) and
``TORCH_CUDA_ARCH_LIST``'s (``9.0``, ``9.0+PTX``); both become (cubin codes,
PTX codes) here, e.g. ({75, 90}, {90}).
"""
import re
from typing import Iterable, List, Set, Tuple

from setup_common import SetupError

Codes = Tuple[Set[int], Set[int]]


def torch_cuda_archs() -> List[str]:
    """The CUDA archs (``sm_XY``) torch was compiled for, GPU or not: before
    torch 2.13 ``torch.cuda.get_arch_list()`` is empty where no GPU is usable,
    as on a build host (``FORCE_CUDA=1``)."""
    import torch
    arch_flags = getattr(torch._C, '_cuda_getArchFlags', None)
    if torch.version.cuda is None or arch_flags is None or torch.cuda.is_available():
        return torch.cuda.get_arch_list()
    return (arch_flags() or '').split()


def default_arch_list(torch_archs: List[str]) -> str:
    """torch's own archs (``sm_75`` ... ``sm_120``) as TORCH_CUDA_ARCH_LIST,
    with PTX of the newest for GPUs newer than all of them.

    Args:
        torch_archs: ``torch_cuda_archs()``.
    """
    codes = sorted({int(a[3:]) for a in torch_archs if re.fullmatch(r'sm_\d+', a)})
    if not codes:
        raise SetupError(f'torch lists no CUDA archs ({torch_archs}); is it a CUDA build?')
    archs = [f'{c // 10}.{c % 10}' for c in codes]
    return ';'.join(archs[:-1] + [archs[-1] + '+PTX'])


def arch_list_codes(arch_list: str) -> Codes:
    """'7.5;8.6+PTX' -> ({75, 86}, {86}): cubin archs and PTX archs."""
    cubins, ptx = set(), set()
    for arch in re.split(r'[;\s]+', arch_list.strip()):
        if not arch:
            continue
        major, minor = arch.split('+')[0].split('.')
        code = 10 * int(major) + int(re.sub(r'\D', '', minor))
        cubins.add(code)
        if arch.endswith('+PTX'):
            ptx.add(code)
    return cubins, ptx


def torch_arch_codes(torch_archs: Iterable[str]) -> Codes:
    """['sm_90', 'sm_90a', 'compute_120'] -> ({90}, {120})."""
    def code(arch: str) -> int:
        return int(re.sub(r'\D', '', arch.split('_', 1)[1]))
    return ({code(a) for a in torch_archs if a.startswith('sm_')},
            {code(a) for a in torch_archs if a.startswith('compute_')})


def runs_on(capability: int, codes: Codes) -> bool:
    """Whether a GPU of ``capability`` (e.g. 89) runs code built for
    ``codes``, by torch's own compatibility rule for cubins; PTX runs on any
    newer GPU."""
    import torch.cuda
    cubins, ptx = codes
    return (any(torch.cuda._code_compatible_with_device(capability, c) for c in cubins)
            or any(c <= capability for c in ptx))
