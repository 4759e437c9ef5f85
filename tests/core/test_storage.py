"""A full or unwritable artifacts folder is told apart from other failures (core.storage)."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.storage import storage_error

TORCH_WRITE = RuntimeError(
    "[enforce fail at inline_container.cc:1] . PytorchStreamWriter failed "
    "writing file data/3: file write failed"
)

# What torch.save raised when the test's artifacts volume filled up mid-checkpoint.
TORCH_SHORT_WRITE = RuntimeError(
    "[enforce fail at inline_container.cc:672] . unexpected pos 15620992 vs 15620880"
)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: the only honest full or read-only folder when the tests run as root."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def test_an_os_error_that_names_a_full_volume_is_disk_full(tmp_path: Path) -> None:
    error = storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert error is not None and error.code == "disk_full"
    assert str(tmp_path) not in error.detail  # no server path in what a client reads


def test_an_unexplained_write_failure_on_a_full_volume_is_disk_full(volume: Path) -> None:
    with pytest.raises(OSError) as filled:
        (volume / "ballast").write_bytes(b"\0" * (2 << 20))
    assert filled.value.errno == errno.ENOSPC
    for exc in (TORCH_WRITE, TORCH_SHORT_WRITE):
        error = storage_error(exc, volume / "job_1")
        assert error is not None and error.code == "disk_full"


def test_a_read_only_volume_is_artifacts_unwritable(volume: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)
    for exc in (OSError(errno.EROFS, "Read-only file system"), TORCH_WRITE):
        error = storage_error(exc, volume / "job_1")
        assert error is not None and error.code == "artifacts_unwritable"
    assert list(volume.iterdir()) == []  # the probe left nothing behind


def test_failures_the_folder_is_not_to_blame_for_stay_unclassified(tmp_path: Path) -> None:
    # A denied write elsewhere, or a writer failing for another reason, while this folder
    # takes writes: not the artifacts folder's fault.
    assert storage_error(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert storage_error(TORCH_WRITE, tmp_path / "job_1") is None
    assert storage_error(TORCH_SHORT_WRITE, tmp_path / "job_1") is None
    assert storage_error(ValueError("bad value"), tmp_path) is None
    assert list(tmp_path.iterdir()) == []
