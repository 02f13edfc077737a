"""Triton's interpreter without its repeated per-call set-up.

The interpreter (triton 3.x) patches ``triton.language`` for the launch, then
again at every call of a ``@triton.jit`` device function inside it, which
lists the language's modules with ``inspect.getmembers`` each time; and it
rebuilds a dtype table at every conversion to numpy. In the memory's kernels,
whose device functions run inside every program, that set-up took about a
quarter of the interpreter's time. Inside ``lean_interpreter()``:

- a device function's call skips the patching when its language modules are
  already patched for the running launch (the launch's own patching, and
  restoring, are unchanged);
- the dtype table is built once.

What a kernel computes is unchanged: the patches a skipped call would make
are the ones in place. Without the interpreter internals this relies on
(another triton), the block runs the interpreter as it is::

    os.environ['TRITON_INTERPRET'] = '1'   # before triton is first imported
    with lean_interpreter():
        memory(x).sum().backward()

It patches the interpreter module for the duration of the block (not thread-safe).
"""
import contextlib
import inspect
from typing import Callable, Dict, FrozenSet, Iterator, List

__all__ = ['lean_interpreter']


def _interpreter_internals():
    """The interpreter module, or None where it lacks what this relies on."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    needed = ('_patch_lang', '_LangPatchScope', '_get_np_dtype')
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

    patch_lang, np_dtype = interpreter._patch_lang, interpreter._get_np_dtype
    patched: List[FrozenSet[int]] = []  # per running launch: ids of its patched language modules
    languages: Dict[Callable, FrozenSet[int]] = {}
    dtypes: dict = {}

    def languages_of(fn) -> FrozenSet[int]:
        if fn not in languages:  # as ``_patch_lang`` finds them
            languages[fn] = frozenset(id(value) for value in fn.__globals__.values()
                                      if inspect.ismodule(value) and value in (tl, tl.core))
        return languages[fn]

    def lean_patch_lang(fn):
        mine = languages_of(fn)
        if patched and mine <= patched[-1]:  # a device call, its languages patched
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        if patched:  # a device call reaching a module the launch did not patch
            patched[-1] = patched[-1] | mine
            return scope
        patched.append(mine)  # a launch: ``GridExecutor`` restores its scope at its end
        restore = scope.restore

        def end_launch() -> None:
            patched.pop()
            restore()

        scope.restore = end_launch
        return scope

    def cached_np_dtype(tt_dtype):
        # a block's numpy dtype is its element's (pointers: uint64 either way)
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):  # unhashable
            return np_dtype(element)
        if element not in dtypes:
            dtypes[element] = np_dtype(element)
        return dtypes[element]

    interpreter._patch_lang, interpreter._get_np_dtype = lean_patch_lang, cached_np_dtype
    try:
        yield
    finally:
        interpreter._patch_lang, interpreter._get_np_dtype = patch_lang, np_dtype
