"""The package's layers, read from the source with ``ast`` (nothing is imported):

* ``convneur_mm/utils`` is the ground floor: it imports nothing else from
  ``convneur_mm``;
* ``convneur_mm/models`` imports only ``convneur_mm.models``,
  ``convneur_mm.registry`` and ``convneur_mm.utils``, so that a config's
  model builds without the engine, the tools or the analysis library;
* ``convneur_mm/models/utils`` imports nothing from the models' backbones,
  layers or converters (no circle through a module that builds a model);
* ``convneur_mm/models/converters`` maps state dicts and builds no model: it
  imports no backbone or layer (the tool that calls it builds the target);
* ``tools/setup`` (the installer) imports nothing from ``convneur_mm``, and at
  module level only the standard library and its own files: it runs before
  the package and the stack are installed;
* nothing in ``convneur_mm/``, ``tools/``, ``benchmarks/`` or a project's
  code imports ``tests`` (a wheel does not carry it);
* nothing in ``convneur_mm/`` or ``tools/`` imports ``benchmarks`` (the lab
  measures the package from a checkout; the wheel does not carry it);
* no tool puts the repository root on ``sys.path``: tools import the
  installed package;
* no circle: no module of ``convneur_mm/`` or ``benchmarks/`` imports,
  through any chain, one that imports it back.

Every import counts, also one inside a function and
``importlib.import_module('...')`` with a literal name.
"""
import ast
import os
import os.path as osp
import sys
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import pytest

from .paths import REPO

PACKAGE = 'convneur_mm'
# (folder, the modules its files may import from the package, why)
LAYERS = [
    ('convneur_mm/utils', ('convneur_mm.utils', ),
     'convneur_mm/utils is the ground floor: it imports nothing else from convneur_mm'),
    ('convneur_mm/models', ('convneur_mm.models', 'convneur_mm.registry', 'convneur_mm.utils'),
     'convneur_mm/models imports only convneur_mm.models, convneur_mm.registry and '
     'convneur_mm.utils'),
    ('convneur_mm/models/utils', ('convneur_mm.models.utils', 'convneur_mm.registry',
                                  'convneur_mm.utils'),
     'convneur_mm/models/utils imports nothing from backbones, layers or converters'),
    ('convneur_mm/models/converters', ('convneur_mm.models.converters',
                                       'convneur_mm.models.utils', 'convneur_mm.utils'),
     'a conversion maps state dicts; the tool that calls it builds the model'),
    ('tools/setup', (),
     'tools/setup runs before the package is installed: it imports nothing from convneur_mm'),
]
LAYER = {folder: (folder, allowed, why) for folder, allowed, why in LAYERS}
INSTALLER = 'tools/setup'
NO_TESTS_IMPORT = ('convneur_mm', 'tools', '.dev_scripts', 'projects', 'benchmarks')
NO_LAB_IMPORT = ('convneur_mm', 'tools')
NO_CIRCLES = ('convneur_mm', 'benchmarks')


class Import(NamedTuple):
    """One imported name: ``module`` is absolute (``from . import x`` in
    package ``a.b`` gives ``a.b.x``); ``statement`` is how the file says it."""
    path: Path
    line: int
    module: str
    statement: str


def python_files(root: Path, folder: str) -> List[Path]:
    """The ``.py`` files under ``root/folder``, tests' own folders left out
    (they may import their helpers from ``tests``)."""
    return sorted(p for p in (root / folder).rglob('*.py')
                  if 'tests' not in p.relative_to(root).parts[1:]
                  and '__pycache__' not in p.parts)


def module_name(path: Path, root: Path) -> str:
    """``convneur_mm/models/__init__.py`` -> ``convneur_mm.models``."""
    parts = list(path.relative_to(root).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def _absolute(path: Path, root: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    name = module_name(path, root)
    package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
    if node.level - 1 >= len(package):
        raise ValueError(f'{path}:{node.lineno}: relative import beyond the top package')
    base = package[:len(package) - node.level + 1]
    return '.'.join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path) -> Iterator[Import]:
    """Every import in ``path``: statements anywhere in the file, and
    ``importlib.import_module`` / ``__import__`` called with a literal name."""
    tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name, f'import {alias.name}')
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(path, root, node)
            written = '.' * node.level + (node.module or '')
            for alias in node.names:
                module = base if alias.name == '*' else f'{base}.{alias.name}'
                yield Import(path, node.lineno, module, f'from {written} import {alias.name}')
        elif (isinstance(node, ast.Call) and _dotted(node.func) in
              ('importlib.import_module', 'import_module', '__import__') and node.args
              and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith('.')):
            name = node.args[0].value
            yield Import(path, node.lineno, name, f'{_dotted(node.func)}({name!r})')


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f'{_dotted(node.value)}.{node.attr}'
    return ''


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + '.')


def layer_violations(root: Path, folder: str, allowed: Iterable[str], why: str) -> List[str]:
    """Imports from the package, by files under ``folder``, of modules outside
    ``allowed``: one line each, ``path:line: statement -- why``."""
    allowed = tuple(allowed)
    return [f'{i.path.relative_to(root)}:{i.line}: {i.statement} -- {why}'
            for path in python_files(root, folder) for i in imports_of(path, root)
            if _within(i.module, PACKAGE) and not any(_within(i.module, a) for a in allowed)]


def non_stdlib_module_imports(root: Path, folder: str) -> List[str]:
    """Module-level imports, by files under ``folder``, of anything but the
    standard library and the folder's own modules (imports inside functions
    may name what the program installed by then, e.g. torch)."""
    own = {p.stem for p in (root / folder).glob('*.py')}
    found = []
    for path in python_files(root, folder):
        tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ['.'] if node.level else [node.module]
            else:
                continue
            found += [f'{path.relative_to(root)}:{node.lineno}: imports {name} at module level '
                      '-- the installer runs on the standard library alone'
                      for name in names if name.split('.')[0] not in own
                      and name.split('.')[0] not in sys.stdlib_module_names]
    return found


def installer_sys_path(root: Path) -> List[str]:
    """``sys.path`` changes in the installer: an import by path is a way
    around the rule that it imports nothing from the package."""
    return [f'{path.relative_to(root)}:{line}: changes sys.path -- the installer imports its '
            'own files, run by path, and the standard library only'
            for path in python_files(root, INSTALLER) for line, _ in _sys_path_entries(path)]


def imports_from(root: Path, folders: Iterable[str], package: str, why: str) -> List[str]:
    """Imports of ``package`` by files under ``folders``: one line each,
    ``path:line: statement -- why``."""
    return [f'{i.path.relative_to(root)}:{i.line}: {i.statement} -- {why}'
            for folder in folders if (root / folder).is_dir()
            for path in python_files(root, folder) for i in imports_of(path, root)
            if _within(i.module, package)]


def find_tests_imports(root: Path, folders: Iterable[str]) -> List[str]:
    """Imports of the ``tests`` package by files under ``folders``."""
    return imports_from(root, folders, 'tests', 'the wheel does not carry tests/; shared '
                        'references live in convneur_mm.testing')


def find_lab_imports(root: Path, folders: Iterable[str]) -> List[str]:
    """Imports of the ``benchmarks`` lab by files under ``folders``."""
    return imports_from(root, folders, 'benchmarks', 'the package and its tools import '
                        'nothing from benchmarks/: the lab is not shipped')


def _module_of(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The module an imported name lives in: its longest prefix that is one
    of ``modules`` (``from a.b import f`` names ``a.b.f``, in ``a.b``)."""
    parts = name.split('.')
    while parts and '.'.join(parts) not in modules:
        parts.pop()
    return '.'.join(parts) or None


def import_cycles(root: Path, folders: Iterable[str]) -> List[List[str]]:
    """The circles among the modules under ``folders``: each set of modules
    that reach one another through their imports (Tarjan's strongly
    connected components of more than one module), sorted."""
    modules = {module_name(p, root): p for folder in folders for p in python_files(root, folder)}
    graph = {name: sorted({_module_of(i.module, modules) for i in imports_of(path, root)}
                          - {None, name}) for name, path in modules.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for other in graph[name]:
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = stack[stack.index(name):]
            del stack[stack.index(name):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(cycles)


class Unresolved(Exception):
    """A path expression the checker cannot evaluate."""


def _assignments(tree: ast.Module) -> Dict[str, ast.AST]:
    """Module-level ``NAME = expr`` (the last one wins)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value
    return found


def _evaluate(node: ast.AST, file: Path, names: Dict[str, ast.AST], depth: int = 0) -> str:
    """The path a ``sys.path`` entry names: ``__file__``, string literals,
    ``os.pardir``, module-level names and ``os.path`` / ``pathlib`` calls."""
    if depth > 20:
        raise Unresolved(ast.dump(node))

    def value(n):
        return _evaluate(n, file, names, depth + 1)

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        if node.id == '__file__':
            return str(file)
        if node.id in names:
            return value(names[node.id])
        raise Unresolved(node.id)
    if isinstance(node, ast.Attribute):
        if node.attr == 'pardir':
            return os.pardir
        if node.attr == 'parent':
            return osp.dirname(value(node.value))
        raise Unresolved(_dotted(node))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):  # Path / 'x'
        return osp.join(value(node.left), value(node.right))
    if isinstance(node, ast.Call):
        func = _dotted(node.func)
        last = func.rsplit('.', 1)[-1]
        if last == 'dirname' and len(node.args) == 1:
            return osp.dirname(value(node.args[0]))
        if last in ('abspath', 'realpath', 'normpath', 'str', 'Path', 'fspath') \
                and len(node.args) == 1:
            return osp.normpath(value(node.args[0]))
        if last == 'join' and node.args:
            return osp.join(*map(value, node.args))
        if last in ('resolve', 'absolute') and isinstance(node.func, ast.Attribute):
            return osp.normpath(value(node.func.value))
        raise Unresolved(func)
    raise Unresolved(ast.dump(node))


def _sys_path_entries(path: Path) -> Iterator[Tuple[int, Optional[str]]]:
    """(line, the path added or None where it cannot be resolved) for each
    ``sys.path.insert`` / ``append`` / ``extend`` in ``path``."""
    tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
    names = _assignments(tree)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and _dotted(node.func.value) == 'sys.path'
                and node.func.attr in ('insert', 'append', 'extend') and node.args):
            continue
        entries = node.args[-1]
        for entry in (entries.elts if node.func.attr == 'extend'
                      and isinstance(entries, (ast.List, ast.Tuple)) else [entries]):
            try:
                yield node.lineno, osp.normpath(_evaluate(entry, path.resolve(), names))
            except Unresolved:
                yield node.lineno, None


def sys_path_root(root: Path, folder: str) -> Dict[str, List[str]]:
    """Files under ``folder`` that put ``root`` on ``sys.path`` (or a path the
    checker cannot resolve): {file: [why, ...]}."""
    found: Dict[str, List[str]] = {}
    top = osp.normpath(str(root.resolve()))
    for path in python_files(root, folder):
        for line, entry in _sys_path_entries(path):
            if entry is None or entry == top:
                what = ('an entry the checker cannot resolve' if entry is None else
                        'the repository root')
                found.setdefault(str(path.relative_to(root).as_posix()), []).append(
                    f'{path.relative_to(root)}:{line}: puts {what} on sys.path -- tools '
                    'import the installed package (pip install -e .)')
    return found


# ------------------------------------------------------------ the repository
ROOT = Path(REPO)


@pytest.mark.parametrize('folder,allowed,why', LAYERS, ids=[f for f, _, _ in LAYERS])
def test_layer_imports_only_what_it_may(folder, allowed, why):
    found = layer_violations(ROOT, folder, allowed, why)
    assert not found, '\n'.join(found)


def test_the_installer_runs_on_the_standard_library():
    found = non_stdlib_module_imports(ROOT, INSTALLER) + installer_sys_path(ROOT)
    assert not found, '\n'.join(found)


def test_nothing_shipped_or_run_imports_tests():
    found = find_tests_imports(ROOT, NO_TESTS_IMPORT)
    assert not found, '\n'.join(found)


def test_neither_the_package_nor_its_tools_import_the_lab():
    found = find_lab_imports(ROOT, NO_LAB_IMPORT)
    assert not found, '\n'.join(found)


def test_no_circle_among_the_packages_modules_or_the_labs():
    found = import_cycles(ROOT, NO_CIRCLES)
    assert not found, '\n'.join(' <-> '.join(cycle) for cycle in found)


def test_no_tool_puts_the_repository_root_on_sys_path():
    found = sys_path_root(ROOT, 'tools')
    assert not found, '\n'.join(line for lines in found.values() for line in lines)


# ------------------------------------------------- the checker on bad files
def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def bad_tree(tmp_path) -> Path:
    """A small repository with one violation of each rule, beside files that
    keep them."""
    for package in ('convneur_mm', 'convneur_mm/utils', 'convneur_mm/models',
                    'convneur_mm/models/layers', 'convneur_mm/models/utils',
                    'convneur_mm/models/converters'):
        _write(tmp_path, f'{package}/__init__.py', '')
    _write(tmp_path, 'convneur_mm/utils/good.py', 'from .paths import x\n'
           'from convneur_mm.utils import cli\nimport os\n')
    _write(tmp_path, 'convneur_mm/utils/bad.py',
           'def lazy():\n    from ..models import ConvNeur\n')
    _write(tmp_path, 'convneur_mm/models/layers/good.py',
           'from ...registry import MODELS\nfrom ..utils.shapes import s\n'
           'from convneur_mm.utils.paths import p\nfrom . import norms\n')
    _write(tmp_path, 'convneur_mm/models/layers/bad.py',
           'import importlib\nengine = importlib.import_module("convneur_mm.engine.compile")\n')
    _write(tmp_path, 'convneur_mm/models/worse.py', 'from convneur_mm import apis\n')
    _write(tmp_path, 'convneur_mm/models/utils/good.py', 'from .shapes import s\n'
           'from ...registry import MODELS\nfrom convneur_mm.utils import paths\n')
    _write(tmp_path, 'convneur_mm/models/utils/bad.py',
           'def build():\n    from ..backbones.convneur import ConvNeur\n')
    _write(tmp_path, 'convneur_mm/models/converters/good.py',
           'from ..utils.warm_start import CONVERTER\n')
    _write(tmp_path, 'convneur_mm/models/converters/bad.py', 'from ..layers import block\n')
    _write(tmp_path, 'tools/setup/good.py', 'import json\nimport elf_reader\n'
           'def f():\n    import torch\n')
    _write(tmp_path, 'tools/setup/elf_reader.py', 'import struct\n')
    _write(tmp_path, 'tools/setup/bad.py', 'import torch\ntry:\n'
           '    from convneur_mm.utils import cuda_env\nexcept ImportError:\n'
           '    import sys\n    sys.path.insert(0, "convneur_mm/utils")\n')
    _write(tmp_path, 'tools/good.py', 'import sys, os.path as osp\n'
           'sys.path.insert(0, osp.dirname(osp.abspath(__file__)))\n')
    _write(tmp_path, 'tools/sub/bad_import.py', 'from tests.paths import REPO\n')
    _write(tmp_path, 'tools/sub/bad_lab.py', 'def f():\n    from benchmarks.common import record\n')
    _write(tmp_path, 'benchmarks/run.py', 'from convneur_mm.analysis import timing\n')
    _write(tmp_path, 'benchmarks/bad.py', 'import tests.threads\n')
    _write(tmp_path, 'benchmarks/tests/test_good.py', 'from tests.paths import REPO\n')
    _write(tmp_path, 'tools/sub/bad_path.py',
           'import os.path as osp, sys\n'
           'ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))\n'
           'sys.path.insert(0, ROOT)\n')
    _write(tmp_path, 'tools/bad_pathlib.py', 'import sys\nfrom pathlib import Path\n'
           'sys.path.append(str(Path(__file__).resolve().parent.parent))\n')
    _write(tmp_path, 'tools/unresolved.py', 'import sys\nsys.path.insert(0, where())\n')
    return tmp_path


def test_checker_names_each_bad_import(bad_tree):
    utils_why = LAYER['convneur_mm/utils'][2]
    utils = layer_violations(bad_tree, *LAYER['convneur_mm/utils'])
    assert utils == ['convneur_mm/utils/bad.py:2: from ..models import ConvNeur -- '
                     + utils_why]
    models = layer_violations(bad_tree, *LAYER['convneur_mm/models'])
    assert [line.split(' -- ')[0] for line in models] == [
        "convneur_mm/models/layers/bad.py:2: importlib.import_module('convneur_mm.engine."
        "compile')", 'convneur_mm/models/worse.py:1: from convneur_mm import apis']
    model_utils = layer_violations(bad_tree, *LAYER['convneur_mm/models/utils'])
    assert [line.split(' -- ')[0] for line in model_utils] == [
        'convneur_mm/models/utils/bad.py:2: from ..backbones.convneur import ConvNeur']
    converters = layer_violations(bad_tree, *LAYER['convneur_mm/models/converters'])
    assert [line.split(' -- ')[0] for line in converters] == [
        'convneur_mm/models/converters/bad.py:1: from ..layers import block']
    installer = layer_violations(bad_tree, *LAYER[INSTALLER])
    assert [line.split(' -- ')[0] for line in installer] == [
        'tools/setup/bad.py:3: from convneur_mm.utils import cuda_env']
    assert [line.split(' -- ')[0] for line in non_stdlib_module_imports(bad_tree, INSTALLER)] \
        == ['tools/setup/bad.py:1: imports torch at module level']
    assert [line.split(' -- ')[0] for line in installer_sys_path(bad_tree)] == [
        'tools/setup/bad.py:6: changes sys.path']
    assert [line.split(' -- ')[0] for line in find_tests_imports(bad_tree, NO_TESTS_IMPORT)] \
        == ['tools/sub/bad_import.py:1: from tests.paths import REPO',
            'benchmarks/bad.py:1: import tests.threads']
    assert find_lab_imports(bad_tree, NO_LAB_IMPORT) == [
        'tools/sub/bad_lab.py:2: from benchmarks.common import record -- the package and its '
        'tools import nothing from benchmarks/: the lab is not shipped']


def test_checker_finds_the_repository_root_on_sys_path(bad_tree):
    found = sys_path_root(bad_tree, 'tools')
    assert sorted(found) == ['tools/bad_pathlib.py', 'tools/sub/bad_path.py',
                             'tools/unresolved.py']
    assert 'puts the repository root on sys.path' in found['tools/sub/bad_path.py'][0]
    assert 'cannot resolve' in found['tools/unresolved.py'][0]


def test_relative_import_beyond_the_package_is_an_error(tmp_path):
    _write(tmp_path, 'convneur_mm/__init__.py', '')
    _write(tmp_path, 'convneur_mm/x.py', 'from ... import y\n')
    with pytest.raises(ValueError, match='beyond the top package'):
        list(imports_of(tmp_path / 'convneur_mm' / 'x.py', tmp_path))


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    package = tmp_path / 'pkg'
    package.mkdir()
    (package / '__init__.py').write_text('')
    (package / 'a.py').write_text('from pkg import b\n')
    (package / 'b.py').write_text('def f():\n    from pkg.a import g\n')
    (package / 'c.py').write_text('from pkg.a import h\nimport pkg.b\n')
    assert import_cycles(tmp_path, ['pkg']) == [['pkg.a', 'pkg.b']]
    (package / 'b.py').write_text('def f():\n    return 1\n')
    assert import_cycles(tmp_path, ['pkg']) == []
