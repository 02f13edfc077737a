"""What every step of the installer shares: its error and the names users set.

The installer (``setup_env.sh`` and the modules beside it) runs before the
package and the stack are installed: its modules import the standard library
and each other at module level, torch and mmcv only inside the functions that
need them, and nothing from ``convneur_mm``.
"""
DOCS = 'docs/user_guides/cuda.md'
ALLOW_CPU = 'CONVNEUR_ALLOW_CPU'
TORCH_BUILD = 'CONVNEUR_TORCH_BUILD'
TORCH_INDEX = 'CONVNEUR_TORCH_INDEX'


class SetupError(RuntimeError):
    """A set-up step that cannot go on; the message says what to do."""
