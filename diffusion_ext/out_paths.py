"""Output paths checked before any work starts, so that an hour of sampling is never lost to a typo in
`--out` at the very end.

A file output must have one of the expected extensions and must not be an existing folder; a folder
output must not be an existing file. Either way the folder it goes into may not exist yet (it is made,
as every command here makes its folders), but the nearest part of the path that does exist must be a
folder this process may write into. The messages name the option, the path and what was expected; the
command's name is added by the caller.
"""
from __future__ import annotations

import os


def _writable_base(path: str, option: str) -> None:
    """The nearest existing ancestor of `path` must be a folder this process can write to."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder, so nothing can be written below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {parent} is not writable by this user")


def check_out_file(path: str, option: str, extensions: tuple[str, ...] = (), what: str = "file") -> str:
    """`path` as a file to write: expected extension (case-insensitive), not a folder, a writable place."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{option}: the path is empty; expected a {what} name")
    if path.endswith(os.sep) or os.path.isdir(path):
        example = os.path.join(path, "out" + (extensions[0] if extensions else ""))
        kind = "is a folder" if os.path.isdir(path) else f"names a folder (it ends in {os.sep})"
        raise ValueError(f"{option} {path}: {kind}; expected a {what} name such as {example}")
    if extensions and not path.lower().endswith(tuple(e.lower() for e in extensions)):
        raise ValueError(f"{option} {path}: expected a {what} name ending in {' or '.join(extensions)}")
    _writable_base(path, option)
    return path


def check_out_dir(path: str, option: str) -> str:
    """`path` as a folder to write into: not an existing file, a writable place."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{option}: the path is empty; expected a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path}: is an existing file; expected a folder (a new or existing one)")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path}: the folder is not writable by this user")
    else:
        _writable_base(path, option)
    return path
