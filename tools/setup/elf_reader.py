"""The NEEDED libraries of an ELF shared object, read in pure Python.

Why: mmcv's ``get_compiling_cuda_version()`` can crash the process while its
CUDA kernels work; the libcudart.so.N that mmcv's ``_ext`` links then still
tells which CUDA it was built for, and ``readelf`` need not be installed.
64-bit little-endian files only (x86-64, aarch64).
"""
import re
import struct
from typing import List, Optional, Tuple

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError('truncated ELF file')
    return data


def _elf_segments(f) -> List[Tuple[int, int, int, int]]:
    """(type, file offset, address, file size) of each program header of a
    64-bit little-endian ELF file (x86-64, aarch64)."""
    head = _read(f, 0, 64)
    if head[:4] != b'\x7fELF' or head[4:6] != b'\x02\x01':
        raise ValueError('not a 64-bit little-endian ELF file')
    phoff, = struct.unpack_from('<Q', head, 0x20)
    entsize, count = struct.unpack_from('<HH', head, 0x36)
    rows = [struct.unpack('<IIQQQQQQ', _read(f, phoff + i * entsize, 56)) for i in range(count)]
    return [(r[0], r[2], r[3], r[5]) for r in rows]


def _dynamic_entries(raw: bytes) -> List[Tuple[int, int]]:
    """(tag, value) of a dynamic section, up to its DT_NULL."""
    entries = []
    for tag, value in struct.iter_unpack('<qQ', raw[:len(raw) // 16 * 16]):
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    return entries


def elf_needed(path: str) -> List[str]:
    """The libraries an ELF shared object names as NEEDED in its dynamic
    section, read in Python (readelf need not be installed). Raises OSError /
    ValueError for a file it cannot read."""
    with open(path, 'rb') as f:
        segments = _elf_segments(f)
        dynamic = [s for s in segments if s[0] == PT_DYNAMIC]
        if not dynamic:
            raise ValueError('no dynamic section')
        entries = _dynamic_entries(_read(f, dynamic[0][1], dynamic[0][3]))
        strtab = [v for t, v in entries if t == DT_STRTAB]
        base = [off + strtab[0] - addr for kind, off, addr, size in segments
                if strtab and kind == PT_LOAD and addr <= strtab[0] < addr + size]
        if not base:
            raise ValueError('no string table')
        return [_read_cstring(f, base[0] + v) for t, v in entries if t == DT_NEEDED]


def _read_cstring(f, offset: int, limit: int = 4096) -> str:
    f.seek(offset)
    return f.read(limit).split(b'\0', 1)[0].decode('utf-8', 'replace')


def cudart_major(path: str) -> Optional[str]:
    """The CUDA major version a library links (its NEEDED libcudart.so.N).

    Args:
        path: an ELF shared object.
    """
    for name in elf_needed(path):
        match = re.fullmatch(r'libcudart\.so\.(\d+)', name)
        if match:
            return match.group(1)
    return None
