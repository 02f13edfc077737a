__version__ = '0.1.0'


def _parse(version: str) -> tuple:
    return tuple(int(x) for x in version.split('.')[:3])


version_info = _parse(__version__)
