"""A failed command leaves nothing behind: what it created under a folder (the folder itself,
missing parents, the lock, an empty checkpoints/, a config.yaml, TensorBoard files) is removed
again, unless the command got as far as writing something a user needs (a checkpoint)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class NewPaths:
    """What exists under ``folder`` now, to remove later whatever was added since."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        # the outermost folder that does not exist yet: all of it will be ours
        self.first_new: Path | None = None
        for p in [self.folder, *self.folder.parents]:
            if p.exists():
                break
            self.first_new = p
        self.before = _listing(self.folder) if self.first_new is None else set()

    def added(self) -> set[Path]:
        """The paths under the folder that were not there when this was made."""
        return _listing(self.folder) - self.before if self.folder.is_dir() else set()

    def remove(self) -> None:
        """Delete what was created since: files, then the folders that held only those."""
        if self.first_new is not None:
            shutil.rmtree(self.first_new, ignore_errors=True)
            return
        added = sorted(self.added(), key=lambda p: -len(p.parts))
        for path in added:
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()  # deepest first: its new contents are already gone
                else:
                    path.unlink()
            except OSError:  # not ours after all (another writer), or not empty: keep it
                pass


def _listing(folder: Path) -> set[Path]:
    found: set[Path] = set()
    for root, dirs, files in os.walk(folder):
        found.update(Path(root, name) for name in dirs + files)
    return found


@contextmanager
def removed_on_failure(paths: NewPaths, keep: Callable[[], bool]) -> Iterator[None]:
    """Remove what ``paths`` did not list if the block raises and ``keep()`` is false."""
    try:
        yield
    except BaseException:
        if not keep():
            paths.remove()
        raise
