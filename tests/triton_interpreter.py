"""The Triton interpreter (TRITON_INTERPRET=1), less its repeated set-up: the tests' largest cost on CPU.

At each launch the interpreter patches ``triton.language`` (every builtin
found by ``inspect.getmembers``) and restores it when the launch ends; it
patches again at every call of a ``@triton.jit`` helper inside the kernel,
although the launch's patch is still in force. Under the interpreter our
kernels call helpers per row and per block: that re-patching took about
two thirds of the interpreted time (cProfile of a ``grpo_loss`` test,
Triton 3.x). :func:`patch_once_per_launch` skips a helper's patch when the
launch has already patched every language module the helper sees; what runs
is unchanged.
"""

from __future__ import annotations

import inspect
import warnings


def patch_once_per_launch() -> bool:
    """Install the skip; False (and nothing changed) where this Triton's interpreter lacks what it wraps."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or getattr(original, "once_per_launch", False):
        return False
    if not hasattr(scope_type(), "restore"):
        warnings.warn("the Triton interpreter's patch scope has no restore(): running it unchanged")
        return False
    # the language modules patched since the launch in progress began (one at a time); empty between launches
    # (every jit function sees at least one: the interpreter asserts it)
    in_force: set = set()

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if in_force and langs <= in_force:
            return scope_type()  # a helper inside the launch: nothing to patch, nothing to restore
        launch = not in_force
        scope = original(fn)
        in_force.update(langs)
        if launch:  # the launch's own patch: it ends with the restore
            restore = scope.restore

            def restore_and_end():
                in_force.clear()
                restore()

            scope.restore = restore_and_end
        return scope

    patch_lang.once_per_launch = True
    patch_lang.__wrapped__ = original
    interpreter._patch_lang = patch_lang
    return True
