"""core/paths.py: the one confinement check behind base-model and dataset paths."""

from __future__ import annotations

import os
from pathlib import Path

from core.paths import is_inside, link_leads_out, real_path


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "data.jsonl").write_text("{}\n")
    (outside / "secret.txt").write_text("no\n")
    return root, outside


def test_plain_paths_inside_and_outside(tmp_path: Path) -> None:
    root, outside = _tree(tmp_path)
    assert is_inside(root / "sub" / "data.jsonl", [root])
    assert is_inside(root, [root])
    assert not is_inside(outside / "secret.txt", [root])
    assert not is_inside(None, [root])
    assert not is_inside(root / "x", [])


def test_dot_dot_is_resolved_before_the_check(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    assert not is_inside(root / "sub" / ".." / ".." / "outside" / "secret.txt", [root])
    assert is_inside(root / "sub" / ".." / "sub" / "data.jsonl", [root])
    # A sibling whose name starts like the root is not inside it.
    (tmp_path / "root2").mkdir()
    assert not is_inside(tmp_path / "root2", [root])


def test_absolute_paths_and_home(tmp_path: Path, monkeypatch) -> None:
    root, _ = _tree(tmp_path)
    assert not is_inside(Path("/etc/passwd"), [root])
    monkeypatch.setenv("HOME", str(root))
    assert is_inside(Path("~/sub/data.jsonl"), [root])


def test_a_link_counts_where_it_leads(tmp_path: Path) -> None:
    root, outside = _tree(tmp_path)
    (root / "out").symlink_to(outside)
    (root / "in").symlink_to(root / "sub")
    assert not is_inside(root / "out" / "secret.txt", [root])
    assert is_inside(root / "in" / "data.jsonl", [root])


def test_a_root_that_is_a_link_counts_as_where_it_leads(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert is_inside(root / "sub" / "data.jsonl", [alias])
    assert is_inside(alias / "sub" / "data.jsonl", [root])


def test_a_link_loop_is_inside_nothing(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    os.symlink(root / "b", root / "a")
    os.symlink(root / "a", root / "b")
    assert real_path(root / "a") is None
    assert not is_inside(root / "a", [root])
    assert link_leads_out(root, [root])


def test_links_inside_a_folder(tmp_path: Path) -> None:
    root, outside = _tree(tmp_path)
    assert not link_leads_out(root, [root])
    (root / "sub" / "fine").symlink_to(root / "sub" / "data.jsonl")
    assert not link_leads_out(root, [root])
    (root / "sub" / "leak").symlink_to(outside / "secret.txt")
    assert link_leads_out(root, [root])
    assert not link_leads_out(root, [root, outside])
    # A link into a forbidden folder inside the roots (the uploads) leads out too.
    assert link_leads_out(root, [root, outside], into=[outside])
