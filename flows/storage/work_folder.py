"""Paths kept in the database, relative to the work folder, so a copied folder is a whole one.

A copy of a work folder (a backup, a staging copy, a bug report) must find its own checkpoints,
outputs and archived files, and must never delete the original's. So every path inside the work
folder is stored relative to it and resolved against the folder of the process that reads it;
a path outside (a landing folder configured elsewhere) stays absolute. Deletions go through
`remove_inside`, which refuses anything outside the folder it is given.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)


def stored_path(root: Path, path: Path | str) -> str:
    """How `path` is kept in the database: relative to `root` (POSIX separators) when inside it."""
    absolute = Path(path).absolute()
    try:
        return absolute.relative_to(root).as_posix()
    except ValueError:
        return str(absolute)


def resolved_path(root: Path, stored: str) -> Path:
    """The file a stored path names, for the work folder `root`."""
    path = Path(stored)
    return path if path.is_absolute() else root / PurePosixPath(stored)


def remove_inside(folder: Path, path: Path) -> bool:
    """Deletes `path` only when it lies inside `folder`; True when something was deleted."""
    target = path.absolute()
    if not target.is_relative_to(folder.absolute()) or ".." in target.parts:
        log.warning("not deleting %s: it lies outside %s", target, folder)
        return False
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    return True
