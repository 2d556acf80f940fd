"""`/soundctm/render`: file names checked when the message arrives, files written confined to the render folder.

A name is checked twice, for two different reasons. On arrival (`check_name`) so that a bad name costs no
inference and gets a `/fail` at once: relative, `.wav`, printable, short enough for the file system, not an
existing folder. At write time (`write_wav`) because the folder can change in between: a client that swaps a
sub-folder for a symbolic link while the job waits would otherwise redirect the write outside. So the write
never resolves a path string: it walks from a descriptor of the render folder one component at a time with
O_NOFOLLOW (a symbolic link anywhere fails with ELOOP/ENOTDIR), writes a temporary file in the final folder's
descriptor and renames it within that descriptor. The check and the write are the same operation.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import unicodedata
from pathlib import Path, PurePosixPath

import numpy as np

MAX_NAME_CHARS = 255  # one path component (NAME_MAX on Linux, in bytes; checked on the UTF-8 form)
MAX_PATH_CHARS = 1024
MAX_DEPTH = 8


class RenderError(ValueError):
    """A render name or target that is refused; the message is the /fail reason."""


def check_name(filename: str, root: Path) -> PurePosixPath:
    """The relative path a render may write, or RenderError. `root` must exist."""
    if not filename:
        raise RenderError("file name is empty")
    if len(filename.encode("utf-8", "surrogatepass")) > MAX_PATH_CHARS:
        raise RenderError(f"file name longer than {MAX_PATH_CHARS} bytes")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in filename):
        raise RenderError("file name contains control characters")
    if filename.startswith(("/", "\\")) or "\\" in filename:
        raise RenderError("file name must be relative, inside the render folder (use / between folders)")
    rel = PurePosixPath(filename)
    parts = rel.parts
    if any(p in ("..", ".") for p in parts) or filename.endswith("/"):
        raise RenderError("file name must be relative, inside the render folder")
    if len(parts) > MAX_DEPTH:
        raise RenderError(f"file name nests more than {MAX_DEPTH} folders")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_CHARS for p in parts):
        raise RenderError(f"a file or folder name is longer than {MAX_NAME_CHARS} bytes")
    if not rel.name.lower().endswith(".wav") or rel.name.startswith("."):
        raise RenderError("file name must end in .wav and not start with a dot")
    target = root / rel
    if target.is_symlink() or target.is_dir():
        raise RenderError("file name is an existing folder or link in the render folder")
    resolved = target.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise RenderError("file name must stay inside the render folder")
    return rel


def _open_dir(name: str, dir_fd: int, create: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):  # another render made it meanwhile
            os.mkdir(name, 0o777, dir_fd=dir_fd)
        return os.open(name, flags, dir_fd=dir_fd)


def write_wav(root: Path, rel: PurePosixPath, audio: np.ndarray, sample_rate: int) -> Path:
    """Write `audio` as a float WAV at root/rel without following any link below root; returns the path.

    Raises RenderError when a folder on the way is a link or a file, or the target is a folder. The temporary
    file never outlives a failure.
    """
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, subtype="FLOAT", format="WAV")
    fds: list[int] = []
    try:
        fds.append(os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)))
        for part in rel.parts[:-1]:
            try:
                fds.append(_open_dir(part, fds[-1], create=True))
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                    raise RenderError(
                        f"folder {part!r} is a link or a file, not a folder of the render folder"
                    ) from None
                raise
        parent = fds[-1]
        tmp = f".{rel.name}.{os.getpid()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o666, dir_fd=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getbuffer())
            os.replace(tmp, rel.name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            if isinstance(e, IsADirectoryError | NotADirectoryError):
                raise RenderError(f"{rel.name!r} is an existing folder in the render folder") from None
            raise
    finally:
        for fd_ in reversed(fds):
            os.close(fd_)
    return root / rel
