"""Writing a directory (or a cache file) all at once: into a temporary
sibling, then renamed.

A crash while the files are written leaves the earlier directory as it was;
only the final rename replaces it. On Linux the swap of an existing
directory is a single atomic `renameat2(RENAME_EXCHANGE)`; elsewhere it is
two renames in a row (the old directory first moves aside).
"""

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first, second):
    """Atomically swaps two paths on Linux; returns False where unsupported."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    return result == 0


def write_cache_file(path, data):
    """Writes the bytes `data` to `path` under a private name first, then
    renames it in place, so a concurrent reader never sees half a file.
    A place that cannot be written to only means no cache: returns whether
    the file was written.

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "cached")
    >>> write_cache_file(path, b"ok"), open(path, "rb").read()
    (True, b'ok')
    """
    staging = f"{os.fspath(path)}.{os.getpid()}.partial"
    try:
        with open(staging, "wb") as file:
            file.write(data)
        os.replace(staging, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(staging)
        return False


def _fsync_directory(path):
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_directory(directory):
    """Yields a temporary directory that replaces `directory` on success.

    If the block raises, the temporary directory is removed and `directory`
    is left untouched.

    Example:

    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "preset")
    >>> with atomic_directory(target) as staging:
    ...     with open(os.path.join(staging, "a.txt"), "w") as file:
    ...         _ = file.write("hello")
    >>> sorted(os.listdir(target))
    ['a.txt']
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"`directory` {directory!r} is a file; give a directory path (it is "
            "created if missing)."
        )
    name = os.path.basename(directory)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield staging
        for entry in os.scandir(staging):
            if entry.is_file():
                with open(entry.path, "rb") as file:
                    os.fsync(file.fileno())
        _fsync_directory(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.chmod(staging, 0o755)
    if not os.path.exists(directory):
        os.rename(staging, directory)
    elif _exchange(staging, directory):
        shutil.rmtree(staging, ignore_errors=True)
    else:
        aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(aside)
        os.rename(directory, aside)
        os.rename(staging, directory)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_directory(parent)


def keep_files(source, staging, names):
    """Carries files `names` over from `source` into `staging` (hard links
    where possible) when they exist there."""
    for relative in names:
        path = os.path.join(source, relative)
        if not os.path.isfile(path):
            continue
        target = os.path.join(staging, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
