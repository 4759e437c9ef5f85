"""Confining the paths a user names (base models, datasets) to the folders the server allows.

Security code, written once: a path counts as inside a root only where it really leads, once
``~``, ``..`` and every link are resolved, and a root that is itself a link counts as the folder
it leads to. A folder is confined only if no link inside it leads out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def real_path(path: Path) -> Path | None:
    """Where ``path`` leads once ``~``, ``..`` and links are resolved; None for a link loop."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def is_inside(path: Path | None, roots: Sequence[Path]) -> bool:
    """Whether the real ``path`` lies in one of the real ``roots`` (None is inside nothing)."""
    if path is None:
        return False
    real = real_path(path)
    return real is not None and any(
        (root_real := real_path(root)) is not None and real.is_relative_to(root_real)
        for root in roots
    )


def link_leads_out(folder: Path, roots: Sequence[Path], *, into: Sequence[Path] = ()) -> bool:
    """Whether a link under ``folder`` leads outside ``roots`` (or into one of ``into``).

    rglob lists linked files but does not enter linked folders, so each link is checked where
    it leads; a link loop counts as leading out.
    """
    return any(
        entry.is_symlink()
        and (not is_inside(entry, roots) or (bool(into) and is_inside(entry, into)))
        for entry in folder.rglob("*")
    )
