"""The TTS output directory: created private, refused when another user could plant WAVs in it.

FreeSWITCH plays whatever file a ``uuid_broadcast`` names, and cached or pinned phrases are
found by names anyone can compute (a SHA-256 of engine, voice and text). So the directory and
its ``cache/`` and ``phrases/`` subdirectories must be owned by the user the daemon runs as
and writable by nobody else:

- created missing (parents too) with mode 0750: the owner writes, the group (give it to the
  ``freeswitch`` group) reads and traverses, others get nothing;
- refused when a symlink, not a directory, owned by another uid, or writable by its group or
  by others (any ``g+w`` or ``o+w``: the simple rule, whatever the group is).

The WAVs themselves are written 0640 by ``audio.write_telephony_wav``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

CACHE_SUBDIR = "cache"
PINNED_SUBDIR = "phrases"
OUTPUT_DIR_MODE = 0o750


class UnsafeOutputDir(ValueError):
    """The output directory is unsafe or unusable; the message names the path, the fault and the fix."""


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create (mode 0750) or check ``path`` and its cache/ and phrases/ subdirectories; returns it.

    Blocking, for start-up. Raises UnsafeOutputDir when a directory is a symlink, not a
    directory, owned by another user, writable by group or others, or cannot be created.
    """
    root = Path(path).absolute()
    for directory in (root, root / CACHE_SUBDIR, root / PINNED_SUBDIR):
        make_private_dir(directory)
    return root


def make_private_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory of ours writable only by us, created 0750 (parents too) if missing."""
    directory = Path(path).absolute()
    missing: list[Path] = []
    for candidate in (directory, *directory.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        _create(candidate)
    check_private_dir(directory)
    return directory


def check_private_dir(path: Path) -> None:
    """Raise UnsafeOutputDir unless ``path`` is a real directory owned by us, writable only by us."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise UnsafeOutputDir(
            f"{path} cannot be inspected ({_reason(exc)}): check the path and its parents' permissions"
        ) from exc
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeOutputDir(
            f"{path} is a symlink (to {os.readlink(path)}), which another user may redirect: "
            "use the real directory's path"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeOutputDir(f"{path} exists but is not a directory: remove it or choose another path")
    my_uid = os.geteuid()
    if info.st_uid != my_uid:
        raise UnsafeOutputDir(
            f"{path} is owned by uid {info.st_uid} ({_user_name(info.st_uid)}), not by uid {my_uid} "
            f"({_user_name(my_uid)}) that runs the daemon, so its owner could plant WAVs in it: "
            f"chown {my_uid} {path}, or choose a directory of your own"
        )
    writable_by = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]
    if writable_by:
        raise UnsafeOutputDir(
            f"{path} is writable by {' and '.join(writable_by)} (mode {stat.S_IMODE(info.st_mode):04o}), "
            f"who could plant WAVs in it: chmod go-w {path}"
        )


def owned_by_us(info: os.stat_result) -> bool:
    """A regular file (not a symlink: pass an lstat) owned by the user the daemon runs as."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()


def _create(directory: Path) -> None:
    try:
        os.mkdir(directory, OUTPUT_DIR_MODE)
    except FileExistsError:
        return  # another daemon (a shard) created it meanwhile: checked like any existing one
    except OSError as exc:
        raise UnsafeOutputDir(
            f"{directory} cannot be created ({_reason(exc)}): create it owned by the daemon's user "
            "with mode 0750, or choose a path that user may create"
        ) from exc
    # The umask may have taken the group's r-x FreeSWITCH needs; keep a set-group-ID bit the
    # parent passed on (it gives new files the directory's group, e.g. freeswitch).
    setgid = os.lstat(directory).st_mode & stat.S_ISGID
    os.chmod(directory, OUTPUT_DIR_MODE | setgid)


def _reason(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return "no such user"
