"""Where a study's files live: a local folder or a URI (s3://, gs://, ...), decided here only.

A study folder is Tune's experiment folder (``<storage>/<study name>``) plus the platform's own
state in ``study_state/``. That state cannot sit beside Tune's files: on ``--resume`` Tune copies
every ``.json`` and ``.pkl`` of the experiment folder's top level into its local staging folder and
from then on uploads that staging folder over the experiment folder, so a file the platform
rewrote there during the resumed run (the scheduler's decisions) was put back to its old content.
Tune does not look into sub-folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the platform's own state inside a study folder (Tune never copies a sub-folder back over it)
STATE_DIR = "study_state"


DEFAULT_ROOT = "runs/studies"  # where studies live unless --storage or $ANCRA_STORAGE says otherwise


def root(storage: str | None = None) -> str:
    """The studies' storage: ``storage`` (--storage), else ``$ANCRA_STORAGE``, else ``runs/studies``."""
    import os

    return storage or os.environ.get("ANCRA_STORAGE") or DEFAULT_ROOT


def is_uri(path: str) -> bool:
    return "://" in path


def join(storage: str, *parts: str) -> str:
    """A path under ``storage``, local or a URI."""
    if is_uri(storage):
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage, *parts))


def state_path(study_dir: str, name: str) -> str:
    """``<study_dir>/study_state/<name>``."""
    return join(study_dir, STATE_DIR, name)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``: a local file atomically (temporary file, then rename), or an object."""
    if is_uri(path):
        import pyarrow.fs

        fs, p = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
        return
    tmp = Path(path + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    tmp.replace(path)


def read_text(path: str) -> str | None:
    """The text at ``path``, or None when there is none (or it cannot be read)."""
    try:
        if is_uri(path):
            import pyarrow.fs

            fs, p = pyarrow.fs.FileSystem.from_uri(path)
            with fs.open_input_stream(p) as f:
                return f.read().decode()
        return Path(path).read_text() if Path(path).is_file() else None
    except (OSError, ValueError):
        return None


def upload(local: Path, dest: str) -> None:
    """Copy the file ``local`` to ``dest`` (a path or a URI); a local destination is replaced
    atomically, so a reader never sees half a file."""
    if is_uri(dest):
        import pyarrow.fs

        fs, p = pyarrow.fs.FileSystem.from_uri(dest)
        with fs.open_output_stream(p) as out, open(local, "rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)
        return
    import shutil

    tmp = Path(dest + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, tmp)
    tmp.replace(dest)


def download(src: str, local: Path) -> bool:
    """Copy ``src`` (a path or a URI) to the file ``local``; False when there is no such file."""
    import shutil

    local.parent.mkdir(parents=True, exist_ok=True)
    if is_uri(src):
        import pyarrow.fs

        fs, p = pyarrow.fs.FileSystem.from_uri(src)
        if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
            return False
        with fs.open_input_stream(p) as f, open(local, "wb") as out:
            while chunk := f.read(1 << 20):
                out.write(chunk)
        return True
    if not Path(src).is_file():
        return False
    shutil.copyfile(src, local)
    return True


def write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1, default=str))


def read_json(path: str) -> Any:
    """The JSON at ``path``, or None when there is none or it is not JSON."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


# Files in a trial's folder of the study's storage, through the pyarrow filesystem Tune gives the
# trial (a local or shared path, or a bucket): what a stopped trial goes on from.

def filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a local path or a URI."""
    import os

    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)


def fs_write(fs: Any, path: str, data: bytes) -> None:
    """Replace ``path`` whole (written beside, then moved): a reader never sees a torn file."""
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def fs_exists(fs: Any, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def fs_read(fs: Any, path: str) -> bytes | None:
    if not fs_exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def fs_remove(fs: Any, path: str) -> None:
    """Remove a file or a folder with what is in it, if it is there."""
    import pyarrow.fs

    kind = fs.get_file_info(path).type
    if kind == pyarrow.fs.FileType.Directory:
        fs.delete_dir(path)
    elif kind != pyarrow.fs.FileType.NotFound:
        fs.delete_file(path)
