"""Every command the manual gives for our Python tools parses with that tool's
own argparse parser, and no page names a tool that is gone.

The manual: docs/**/*.md, README.md, tools/README.md, benchmarks/README.md and
projects/**/README.md. A command is a ``tools/...py`` script (or a bare tool
name such as ``benchmark.py``) with its arguments, ``mim run convneur_mm NAME
...``, or the lab's ``python -m benchmarks.run CASE ...``, in a fenced or
indented code block or in inline code. Placeholders in capitals
(CONFIG, CKPT, WORK_DIR, PATH) stand for values: only option and task names
must parse, so a placeholder skips an option's type and choices checks, except
those of ``--task``.
"""
import argparse
import functools
import inspect
import os.path as osp
import re
import shlex
from glob import glob
from typing import List, NamedTuple, Optional, Tuple
from unittest import mock

import pytest

from .paths import REPO, import_file

PAGES = sorted({osp.relpath(p, REPO) for pattern in (
    'docs/**/*.md', 'README.md', 'tools/README.md', 'benchmarks/README.md',
    'projects/**/README.md')
    for p in glob(osp.join(REPO, pattern), recursive=True)})
TOOL_DIRS = ('tools', 'tools/analysis_tools', 'tools/model_converters', 'tools/deployment')
TOOLS = {osp.basename(p): osp.relpath(p, REPO)
         for d in TOOL_DIRS for p in glob(osp.join(REPO, d, '*.py'))}
LAB_RUNNER = 'benchmarks/run.py'  # ``python -m benchmarks.run``
# the analysis tools that benchmark.py and analyze_model.py replaced, and the
# maintainers' scripts that went; a path under these prefixes is the library's
# module or the script's new home, not the tool
REMOVED = ('get_flops', 'count_ops', 'count_compilations', 'fp16_headroom',
           'effective_receptive_field', 'visualize_gates', 'ablation_table', 'benchmark_speed',
           'benchmark_compile', 'benchmark_onnx', 'benchmark_memory', 'benchmark_with_cp',
           'resolution_scaling', 'imagenet_memory', 'speed_report', 'exit_code_soak',
           'gpu_todo', 'carry_stack', 'device_env')
NEW_HOMES = ('convneur_mm/analysis/', 'convneur_mm.analysis.', '.dev_scripts/')
REMOVED_PATTERN = re.compile(
    r'(?P<path>[\w./-]*?)\b(?:(?:%s)\.(?:py|sh)\b|mim run convneur_mm (?:%s)\b'
    r'|analysis_tools/(?:%s)(?:\.py|\.sh)?\b)|configs/probe/' % (('|'.join(REMOVED),) * 3))
PLACEHOLDER = re.compile(r'[A-Z][A-Z0-9_]*(\.[a-z]+)?')
SHELL_OPERATORS = {'|', '||', '&&', ';', '&', '>', '>>', '2>&1', '<'}
# the tasks of the two analysis tools that became the lab's cases of the same
# name: the changelog's released entries still name them as they shipped
MOVED_TO_LAB = {'benchmark.py': ('memory', 'train', 'precision', 'compile', 'onnx', 'resolution'),
                'analyze_model.py': ('ops',)}
CHANGELOG = 'docs/notes/changelog.md'
COMMAND_START = re.compile(r'([A-Z_]+=\S*\s+)*(\S*python\S*|tools/|mim |bash |\$ )')


class Command(NamedTuple):
    page: str
    script: str  # as written
    argv: List[str]
    whole: bool = True  # False: inline code, which may leave out what is required


def code_snippets(text: str) -> List[Tuple[str, bool]]:
    """The code of a Markdown page: each line of its fenced blocks, each
    command line of its indented blocks (continued lines joined), each span
    of inline code; with whether it is a whole line (not inline code)."""
    snippets = []
    fences = re.findall(r'^ *```[^\n]*\n(.*?)^ *```', text, re.S | re.M)
    for block in fences:
        snippets += [(line, True) for line in block.replace('\\\n', ' ').splitlines()]
    prose = re.sub(r'^ *```[^\n]*\n.*?^ *```', '', text, flags=re.S | re.M)
    for line in re.sub(r'\\\n\s*', ' ', prose).splitlines():
        if line.startswith('    ') and COMMAND_START.match(line.strip()):
            snippets.append((line.strip(), True))
    snippets += [(' '.join(span.split()), False) for span in re.findall(r'`([^`]+)`', prose)]
    return snippets


def _words(snippet: str) -> List[str]:
    try:
        return shlex.split(snippet, comments=True)
    except ValueError:  # prose in inline code: an apostrophe
        return snippet.split()


def _arguments(words: List[str]) -> List[str]:
    """The words up to a shell operator, without the optional's brackets."""
    argv = []
    for word in words:
        if word in SHELL_OPERATORS:
            break
        word = word.strip('[]').split('|')[0]  # a choice among a|b: the first
        if word:
            argv.append(word)
    return argv


def commands_in(snippet: str, page: str = '', whole: bool = True) -> List[Command]:
    """The tool commands of one snippet of code (at most one)."""
    words = _words(snippet)
    for i, word in enumerate(words):
        word = word[2:] if word.startswith('./') else word
        if word == 'run' and words[i + 1:i + 2] == ['convneur_mm'] and 'mim' in words[:i]:
            name = words[i + 2] if i + 2 < len(words) else ''
            return [Command(page, f'mim run convneur_mm {name}', _arguments(words[i + 3:]),
                            whole)]
        if word == 'benchmarks.run' and words[i - 1:i] == ['-m']:
            return [Command(page, LAB_RUNNER, _arguments(words[i + 1:]), whole)]
        is_tool = word.endswith('.py') and (word.startswith('tools/') or word in TOOLS)
        if is_tool and not word.startswith(('tools/demo/', 'tools/setup/')):
            return [Command(page, word, _arguments(words[i + 1:]), whole)]
    return []


def documented_commands(pages=PAGES) -> List[Command]:
    """Every tool command of the manual. A tool named without arguments is a
    mention, one with ``...`` a synopsis: neither is a command."""
    found = []
    for page in pages:
        with open(osp.join(REPO, page), encoding='utf-8') as f:
            for snippet, whole in code_snippets(f.read()):
                found += [c for c in commands_in(snippet, page, whole)
                          if c.argv and '...' not in c.argv]
    return found


def script_path(command: Command) -> Optional[str]:
    """The repository path of the command's script, or None where there is none."""
    if command.script.startswith('mim run'):  # MIM runs tools/**/NAME.py
        name = command.script.split()[-1] + '.py'
        return TOOLS.get(name)
    if '/' not in command.script:
        return TOOLS.get(command.script)
    return command.script if osp.isfile(osp.join(REPO, command.script)) else None


@functools.lru_cache(maxsize=None)
def _tool(path: str):
    return import_file('docs_' + re.sub(r'\W', '_', path), osp.join(REPO, path))


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def parse(path: str, argv: List[str], whole: bool = True) -> argparse.Namespace:
    """``argv`` parsed by the tool at ``path``: through its ``parse_args(argv)``,
    else by its ``main(argv)`` stopped as soon as its parser has parsed. Not
    ``whole``: missing required arguments are no error (``test.py --amp``
    names an option)."""
    argv = [w + '.py' if re.fullmatch(r'CONFIG\d*', w) else w for w in argv]  # configs end .py
    tool = _tool(path)
    # argparse's _get_value and _check_value are where a value meets its type
    # and its choices: the one place to let a placeholder through
    get_value, check_value = (argparse.ArgumentParser._get_value,
                              argparse.ArgumentParser._check_value)
    error = argparse.ArgumentParser.error

    def value(parser, action, text):
        return text if PLACEHOLDER.fullmatch(text) else get_value(parser, action, text)

    def check(parser, action, text):
        placeholder = isinstance(text, str) and PLACEHOLDER.fullmatch(text)
        if action.dest in ('task', 'tasks') or not placeholder:  # task names must be real
            check_value(parser, action, text)

    def missing(parser, message):
        if whole or not re.search(r'\brequired\b|\bneeds\b', message):
            error(parser, message)

    with mock.patch.object(argparse.ArgumentParser, '_get_value', value), \
            mock.patch.object(argparse.ArgumentParser, '_check_value', check), \
            mock.patch.object(argparse.ArgumentParser, 'error', missing):
        parse_args = getattr(tool, 'parse_args', None)
        if parse_args and inspect.signature(parse_args).parameters:
            return parse_args(argv)
        parse_args = argparse.ArgumentParser.parse_args

        def stop(parser, args=None, namespace=None):
            raise _Parsed(parse_args(parser, args, namespace))

        with mock.patch.object(argparse.ArgumentParser, 'parse_args', stop):
            try:
                tool.main(argv)
            except _Parsed as parsed:
                return parsed.namespace
    raise AssertionError(f'{path}: main() returned without parsing its arguments')


def moved_task(command: Command) -> Optional[str]:
    """The task a changelog command names that moved to the lab, else None."""
    moved = MOVED_TO_LAB.get(osp.basename(command.script), ())
    if command.page != CHANGELOG or not moved:
        return None
    argv = command.argv
    for option in ('--task', '--tasks'):
        if option in argv:
            return next((t for t in argv[argv.index(option) + 1:] if t in moved), None)
    return None


COMMANDS = documented_commands()


@pytest.mark.parametrize('command', COMMANDS,
                         ids=lambda c: f'{c.page}: {c.script} {" ".join(c.argv)}'[:150])
def test_documented_command_parses(command, tmp_path, monkeypatch):
    moved = moved_task(command)
    if moved:  # the changelog's history: the task lives on as the lab's case
        assert moved in _tool(LAB_RUNNER).CASES, moved
        return
    path = script_path(command)
    assert path, f'{command.page}: {command.script} does not exist'
    monkeypatch.chdir(tmp_path)  # output paths are checked where a clean clone has none
    parse(path, command.argv, command.whole)  # a usage error exits 2


def test_every_task_of_the_two_analysis_tools_has_a_command():
    for name, option in (('benchmark.py', 'task'), ('analyze_model.py', 'tasks')):
        path = TOOLS[name]
        shown = set()
        for command in COMMANDS:
            if script_path(command) == path and not moved_task(command):
                tasks = getattr(parse(path, command.argv, command.whole), option)
                shown.update([tasks] if isinstance(tasks, str) else tasks)
        assert shown == set(_tool(path).TASKS), name


def test_every_case_of_the_lab_has_a_command():
    shown = {parse(LAB_RUNNER, c.argv, c.whole).case for c in COMMANDS
             if c.script == LAB_RUNNER and c.page == 'benchmarks/README.md'}
    assert shown - {'CASE'} == set(_tool(LAB_RUNNER).CASES)


def removed_names(text: str) -> List[str]:
    """The removed tools ``text`` names."""
    return [m.group(0) for m in REMOVED_PATTERN.finditer(text)
            if not (m.group('path') or '').endswith(NEW_HOMES)]


@pytest.mark.parametrize('page', PAGES)
def test_no_page_names_a_removed_tool(page):
    with open(osp.join(REPO, page), encoding='utf-8') as f:
        text = f.read()
    if page == 'docs/notes/changelog.md':  # released versions' entries name what shipped
        text = re.split(r'^## v', text, flags=re.M)[1]
    assert not removed_names(text), page


def test_the_collector_reads_every_form_of_command():
    page = ('```bash\npython tools/train.py CONFIG \\\n  --amp  # comment\n```\n'
            'Then `analyze_model.py --tasks\nops` or `benchmark.py`, and\n\n'
            '    CONVNEUR_X=0 python tools/analysis_tools/benchmark.py --task speed | tee log\n\n'
            '```\npython -m mim run convneur_mm analyze_model --tasks flops [--shape 224]\n```\n'
            'and `python -m benchmarks.run ops --device meta`.\n')
    found = [c for s, whole in code_snippets(page) for c in commands_in(s, '', whole)]
    assert [(c.script, c.argv) for c in found] == [
        ('tools/train.py', ['CONFIG', '--amp']),
        ('mim run convneur_mm analyze_model', ['--tasks', 'flops', '--shape', '224']),
        ('tools/analysis_tools/benchmark.py', ['--task', 'speed']),
        ('analyze_model.py', ['--tasks', 'ops']), ('benchmark.py', []),
        ('benchmarks/run.py', ['ops', '--device', 'meta'])]
    assert [c.whole for c in found] == [True, True, True, False, False, False]
    assert script_path(found[1]) == 'tools/analysis_tools/analyze_model.py'


def test_removed_names_spare_their_new_homes():
    assert removed_names('`get_flops.py`, tools/analysis_tools/count_ops.py, configs/probe/x.py'
                         ', mim run convneur_mm get_flops') == [
        'get_flops.py', 'tools/analysis_tools/count_ops.py', 'configs/probe/',
        'mim run convneur_mm get_flops']
    assert not removed_names('convneur_mm/analysis/ablation_table.py '
                             '.dev_scripts/exit_code_soak.sh resolution_scaling.png')


def test_a_wrong_option_fails_and_a_placeholder_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = TOOLS['benchmark.py']
    assert parse(path, ['--task', 'speed', '--batch', 'N']).batch == 'N'
    assert parse(path, ['--task', 'speed', '--models', 'MODEL']).models == ['MODEL']
    for argv in (['--task', 'speed', '--budget', '60'], ['--task', 'nosuch'],
                 ['--task', 'TASK'], ['--task', 'speed', '--models', 'm1']):
        with pytest.raises(SystemExit):
            parse(path, argv)
    with pytest.raises(SystemExit):  # a converter's parser, reached through main()
        parse(TOOLS['cls_to_backbone.py'], ['SRC'])
    assert parse(TOOLS['cls_to_backbone.py'], ['SRC', 'DST']).dst == 'DST'
    assert parse(TOOLS['test.py'], ['--amp'], whole=False).amp  # inline: an option named
    with pytest.raises(SystemExit):
        parse(TOOLS['test.py'], ['--amp', '--nosuch'], whole=False)
