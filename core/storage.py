"""Tell a full or unwritable artifact folder apart from other failures of a job.

Writers report these differently: Python raises OSError with ENOSPC or EROFS, safetensors
wraps the OS error in its message, and torch.save names no cause ("unexpected pos"). So the error
chain is read first; a full volume is named there, and for a refused or unexplained write a
small probe write into the job's folder tells whether the folder is the cause.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import uuid
from pathlib import Path

from core.errors import ArtifactsUnwritable, DiskFull, MedtuneError

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_FULL_WORDS = ("no space left on device", "storagefull", "disk quota exceeded")
_UNWRITABLE_WORDS = ("read-only file system", "permission denied")
# torch.save's zip writer (inline_container.cc) fails with "file write failed" or
# "unexpected pos N vs M" (a short write), never with the OS error.
_UNEXPLAINED_WORDS = ("inline_container.cc", "file write failed")
PROBE_BYTES = 1 << 20


def storage_error(exc: BaseException, folder: Path) -> MedtuneError | None:
    """A DiskFull or ArtifactsUnwritable for ``exc`` raised while writing under ``folder``.

    None when the failure is not the volume's (or a probe finds nothing wrong with it).
    """
    chain = _chain(exc)
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    text = " ".join(str(e) for e in chain).lower()
    if codes & FULL or any(w in text for w in _FULL_WORDS):
        return _full(folder)
    if codes & UNWRITABLE or any(w in text for w in (*_UNWRITABLE_WORDS, *_UNEXPLAINED_WORDS)):
        # A denied or unexplained write may concern another path: blame the artifacts folder
        # only if it refuses a write itself.
        return _probe(folder)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _probe(folder: Path) -> MedtuneError | None:
    """Write and delete 1 MiB in ``folder`` (or its nearest existing parent): the OS says why."""
    probe = _existing(folder) / f".medtune-probe-{uuid.uuid4().hex}"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
    except OSError as exc:
        if exc.errno in FULL:
            return _full(folder)
        if exc.errno in UNWRITABLE:
            return _unwritable()
        return None
    finally:
        with contextlib.suppress(OSError):  # a read-only volume refuses even this unlink
            probe.unlink(missing_ok=True)
    return None


def _full(folder: Path) -> DiskFull:
    try:
        free = f" ({shutil.disk_usage(_existing(folder)).free / 2**20:.1f} MiB free)"
    except OSError:
        free = ""
    return DiskFull(
        f"the artifacts volume is full{free}; free space or move MEDTUNE_HOME to a larger "
        "volume, then submit the job again (its complete checkpoints are kept)",
        field="training_config.output_dir",
    )


def _unwritable() -> ArtifactsUnwritable:
    return ArtifactsUnwritable(
        "the artifacts folder cannot be written (read-only or no permission); make "
        "MEDTUNE_HOME/jobs writable for the worker, then submit the job again",
        field="training_config.output_dir",
    )


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder
