"""Per-instance method binding, the way Liger-Kernel patches a model: the new function is bound to one
object and stored in that object's __dict__, where attribute lookup finds it before the class's method.

Nothing else about the object changes: no parameter, buffer, submodule or state_dict key is added,
renamed or removed, the class stays the same (isinstance, save_pretrained, from_config see what they
saw), copy.deepcopy rebinds the method to the copy (copy's rule for bound methods), and removing the
attribute brings back the class's own method.
"""
from __future__ import annotations

import types

_MARK = "_diffusion_ext_patch"


def patch_function(fn):
    """Marks `fn` as one of ours, so that bound_here/unbind recognise it (and leave anyone else's alone)."""
    setattr(fn, _MARK, True)
    return fn


def instance_method(obj, name: str):
    """The method bound on this instance under `name` (None when the class's own is used)."""
    return vars(obj).get(name) if hasattr(obj, "__dict__") else None


def is_ours(obj, name: str) -> bool:
    bound = instance_method(obj, name)
    return getattr(getattr(bound, "__func__", None), _MARK, False)


def taken_by_someone_else(obj, name: str) -> bool:
    """True when another library (an accelerate hook, a user) already replaced `name` on this instance:
    patching over it would lose theirs, so the caller leaves the object alone."""
    return instance_method(obj, name) is not None and not is_ours(obj, name)


def bind(obj, name: str, fn) -> None:
    """obj.name = fn bound to obj, for this instance only."""
    if not getattr(fn, _MARK, False):
        raise ValueError(f"bind: {fn!r} is not marked with patch_function")
    vars(obj)[name] = types.MethodType(fn, obj)


def unbind(obj, name: str) -> bool:
    """Removes our method `name` from the instance (the class's runs again); False if it was not ours."""
    if not is_ours(obj, name):
        return False
    del vars(obj)[name]
    return True
