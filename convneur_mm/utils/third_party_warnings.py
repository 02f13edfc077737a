"""Known third-party warnings that tell our users nothing they can act on,
silenced where our entry points start (``tools/train.py``, ``tools/test.py``,
the two analysis tools, the demo scripts, ``python -m convneur_mm``); never in the library itself.

Each filter names the message, the category and the third-party module the
warning is attributed to, so that the same words raised by our own code, or
by any other module, still show.
"""
import warnings
from typing import NamedTuple, Type


class KnownWarning(NamedTuple):
    message: str  # a regular expression matched at the message's start
    category: Type[Warning]
    module: str  # a regular expression matched against the module it is attributed to


KNOWN = (
    # setuptools >= 81 warns whenever pkg_resources runs: MMEngine's and MIM's
    # package look-ups import it, then reload it at each call (the warning is then
    # attributed to importlib); a dozen lines in a demo, none for our users to act on.
    KnownWarning(r'pkg_resources is deprecated as an API', UserWarning,
                 r'(mmengine\.utils\.package_utils|mim\.utils\.utils|importlib)$'),
)


def silence_known_third_party_warnings() -> None:
    """Ignore each ``KNOWN`` warning (message, category and module all match)."""
    for known in KNOWN:
        warnings.filterwarnings('ignore', message=known.message, category=known.category,
                                module=known.module)
