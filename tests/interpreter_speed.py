"""Triton's interpreter without its repeated per-call set-up.

The interpreter (triton 3.x) patches ``triton.language`` for the launch, then
again at every call of a ``@triton.jit`` device function inside it, which
lists the language's modules with ``inspect.getmembers`` each time; and it
rebuilds a dtype table at every conversion to numpy. In the memory's kernels,
whose device functions run inside every program, that set-up took a quarter
to two fifths of the interpreter's time. Inside ``lean_interpreter()``:

- a device function's call inside a launch skips the patching when its
  language modules are already patched for that launch (the launch's own
  patching, and restoring, are unchanged);
- the dtype table is built once;
- integer arithmetic skips the overflow check, which took a third of the
  backward kernels' time and is thrown away: without ``debug=True`` its
  ``device_assert`` asserts nothing.

What a kernel computes is unchanged: the patches a skipped call would make
are the ones in place. Without the interpreter internals this relies on
(another triton), the block runs the interpreter as it is::

    os.environ['TRITON_INTERPRET'] = '1'   # before triton is first imported
    with lean_interpreter():
        memory(x).sum().backward()

It patches the interpreter's module and launcher for the duration of the
block (not thread-safe).
"""
import contextlib
import dataclasses
import inspect
from typing import Callable, Dict, FrozenSet, Iterator, List, Set

__all__ = ['lean_interpreter']


def _interpreter_internals():
    """The interpreter module, or None where it lacks what this relies on."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    needed = ('_patch_lang', '_LangPatchScope', '_get_np_dtype', 'GridExecutor',
              'interpreter_builder')
    return interpreter if all(hasattr(interpreter, name) for name in needed) else None


@contextlib.contextmanager
def lean_interpreter() -> Iterator[None]:
    """Run Triton's interpreter inside the block without its repeated
    set-up (see the module's docstring)."""
    interpreter = _interpreter_internals()
    if interpreter is None:
        yield
        return
    import triton.language as tl

    executor = interpreter.GridExecutor
    launch = executor.__call__
    patch_lang, np_dtype = interpreter._patch_lang, interpreter._get_np_dtype
    launches: List[Set[int]] = []  # per running launch: ids of the language modules patched
    languages: Dict[Callable, FrozenSet[int]] = {}
    dtypes: dict = {}

    def languages_of(fn) -> FrozenSet[int]:
        if fn not in languages:  # as ``_patch_lang`` finds them
            languages[fn] = frozenset(id(value) for value in fn.__globals__.values()
                                      if inspect.ismodule(value) and value in (tl, tl.core))
        return languages[fn]

    def tracked_launch(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    def lean_patch_lang(fn):
        mine = languages_of(fn)
        # an empty ``mine`` goes on to the real one, which refuses it
        if mine and launches and mine <= launches[-1]:
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        if launches:
            launches[-1].update(mine)
        return scope

    def cached_np_dtype(tt_dtype):
        # a block's numpy dtype is its element's (pointers: uint64 either way)
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):  # unhashable
            return np_dtype(element)
        if element not in dtypes:
            dtypes[element] = np_dtype(element)
        return dtypes[element]

    builder = interpreter.interpreter_builder
    options = builder.options
    executor.__call__ = tracked_launch
    interpreter._patch_lang, interpreter._get_np_dtype = lean_patch_lang, cached_np_dtype
    if hasattr(options, 'sanitize_overflow'):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    try:
        yield
    finally:
        executor.__call__ = launch
        interpreter._patch_lang, interpreter._get_np_dtype = patch_lang, np_dtype
        builder.options = options
