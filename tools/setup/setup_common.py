"""What every step of the installer shares: its error, the names users set and the pins.

The installer (``setup_env.sh`` and the modules beside it) runs before the
package and the stack are installed: its modules import the standard library
and each other at module level, torch and mmcv only inside the functions that
need them, and nothing from ``convneur_mm``.
"""
import re
from typing import Dict

DOCS = 'docs/user_guides/cuda.md'
ALLOW_CPU = 'CONVNEUR_ALLOW_CPU'
TORCH_BUILD = 'CONVNEUR_TORCH_BUILD'
TORCH_INDEX = 'CONVNEUR_TORCH_INDEX'


class SetupError(RuntimeError):
    """A set-up step that cannot go on; the message says what to do."""


def read_pins(path: str) -> Dict[str, str]:
    """``name===version`` / ``name==version`` lines of a requirements file."""
    pins = {}
    with open(path) as f:
        for line in f:
            match = re.match(r'\s*([A-Za-z0-9_.-]+)\s*={2,3}\s*([^\s#;]+)', line)
            if match:
                pins[match.group(1).lower()] = match.group(2)
    return pins
