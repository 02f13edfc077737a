"""Where the repository is, for tests that run its tools, configs and scripts."""
import importlib
import importlib.util
import os.path as osp
import sys
from types import ModuleType

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
ANALYSIS_TOOLS = osp.join(REPO, 'tools', 'analysis_tools')


def import_analysis_tool(name: str) -> ModuleType:
    """tools/analysis_tools/NAME.py as a module (the scripts are not a package)."""
    sys.path.insert(0, ANALYSIS_TOOLS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(ANALYSIS_TOOLS)


def import_file(name: str, path: str) -> ModuleType:
    """The Python file at ``path`` as a module called ``name`` (tools are scripts,
    not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_tool(name: str) -> ModuleType:
    """tools/NAME.py as a module, under another name ('test' is the standard
    library's package)."""
    return import_file(f'convneur_tools_{name}', osp.join(REPO, 'tools', f'{name}.py'))

