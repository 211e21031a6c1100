"""Tests for ivr_daemon.storage: the TTS output directory is created private and refused when unsafe."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from ivr_daemon.storage import (
    CACHE_SUBDIR,
    OUTPUT_DIR_MODE,
    PINNED_SUBDIR,
    UnsafeOutputDir,
    prepare_output_dir,
)
from ivr_daemon.tts import cache as cache_module
from ivr_daemon.tts import pinned as pinned_module
from harness import give_to

# Someone else: "nobody" on Debian. Only root may give a file away, as an attacker's would be.
OTHER_UID = 65534


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_subdirectory_names_are_the_ones_the_cache_and_pinned_phrases_use():
    assert (CACHE_SUBDIR, PINNED_SUBDIR) == (cache_module.CACHE_SUBDIR, pinned_module.PINNED_SUBDIR)
    assert issubclass(UnsafeOutputDir, ValueError)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o000])
def test_missing_directories_are_created_0750_parents_too_whatever_the_umask(tmp_path, mask):
    root = tmp_path / "state" / "ivr-daemon" / "tts"

    with umask(mask):
        assert prepare_output_dir(root) == root

    for created in (tmp_path / "state", tmp_path / "state" / "ivr-daemon", root, root / "cache", root / "phrases"):
        assert stat.S_ISDIR(os.lstat(created).st_mode)
        assert mode_of(created) == OUTPUT_DIR_MODE == 0o750
        assert os.lstat(created).st_uid == os.geteuid()


def test_a_relative_path_comes_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    assert prepare_output_dir("tts") == tmp_path / "tts"
    assert (tmp_path / "tts" / "phrases").is_dir()


def test_an_existing_safe_directory_is_accepted_and_left_as_it_is(tmp_path):
    root = tmp_path / "tts"
    root.mkdir(mode=0o700)
    os.chmod(root, 0o700)
    (root / "cache").mkdir()
    os.chmod(root / "cache", 0o755)
    (root / "cache" / "kept.wav").write_bytes(b"RIFF")

    assert prepare_output_dir(root) == root
    assert prepare_output_dir(root) == root  # twice: every shard runs it at start-up

    assert (mode_of(root), mode_of(root / "cache")) == (0o700, 0o755)
    assert (root / "cache" / "kept.wav").read_bytes() == b"RIFF"


def test_a_set_group_id_parent_passes_its_group_bit_on(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o2750)

    prepare_output_dir(parent / "tts")

    # New files then get the directory's group (e.g. freeswitch), not the daemon's.
    assert os.lstat(parent / "tts" / "cache").st_mode & stat.S_ISGID
    assert mode_of(parent / "tts" / "cache") == 0o2750


@pytest.mark.parametrize("which", ["", CACHE_SUBDIR, PINNED_SUBDIR])
def test_a_directory_owned_by_another_user_is_refused(tmp_path, which):
    root = tmp_path / "tts"
    prepare_output_dir(root)
    give_to(root / which, OTHER_UID, -1)

    with pytest.raises(UnsafeOutputDir) as refused:
        prepare_output_dir(root)

    message = str(refused.value)
    assert str(root / which) in message
    assert f"owned by uid {OTHER_UID}" in message
    assert f"chown {os.geteuid()} {root / which}" in message


@pytest.mark.parametrize("mode, who", [(0o777, "its group and others"), (0o757, "others"),
                                       (0o770, "its group"), (0o1777, "its group and others")])
@pytest.mark.parametrize("which", ["", CACHE_SUBDIR, PINNED_SUBDIR])
def test_a_directory_writable_by_group_or_others_is_refused(tmp_path, mode, who, which):
    root = tmp_path / "tts"
    prepare_output_dir(root)
    os.chmod(root / which, mode)

    with pytest.raises(UnsafeOutputDir) as refused:
        prepare_output_dir(root)

    message = str(refused.value)
    assert f"{root / which} is writable by {who} (mode {mode:04o})" in message
    assert f"chmod go-w {root / which}" in message


@pytest.mark.parametrize("which", ["", CACHE_SUBDIR, PINNED_SUBDIR])
def test_a_symlink_is_refused_even_to_a_directory_of_ours(tmp_path, which):
    real = tmp_path / "real"
    prepare_output_dir(real)
    root = tmp_path / "tts"
    if which:
        prepare_output_dir(root)
        os.rmdir(root / which)
    (root / which).symlink_to(real)

    with pytest.raises(UnsafeOutputDir, match="is a symlink") as refused:
        prepare_output_dir(root)

    assert str(root / which) in str(refused.value)


def test_a_file_where_the_directory_should_be_is_refused(tmp_path):
    (tmp_path / "tts").write_bytes(b"not a directory")

    with pytest.raises(UnsafeOutputDir, match="is not a directory"):
        prepare_output_dir(tmp_path / "tts")


def test_a_directory_that_cannot_be_created_is_refused_with_the_reason(tmp_path):
    (tmp_path / "file").write_bytes(b"")

    with pytest.raises(UnsafeOutputDir) as refused:
        prepare_output_dir(tmp_path / "file" / "tts")

    message = str(refused.value)
    assert f"{tmp_path / 'file' / 'tts'} cannot be created" in message
    assert "NotADirectoryError" in message

