"""Atomic file writes: write under a temporary name in the same folder, then rename."""
import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    A crash or exception inside the block leaves any existing ``path`` untouched.
    """
    path = os.fspath(path)
    if os.path.isdir(path):  # before the block writes anything (the rename onto a folder would fail after)
        raise IsADirectoryError(f"{path} is a folder; give the file to write")
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def replace_markdown_section(path: str, section: str, first_heading: str, last_heading: str = "") -> None:
    """Put ``section`` into the markdown file ``path`` in place of the ``## `` sections from
    ``first_heading`` through ``last_heading`` (default: ``first_heading`` alone), or append it when
    ``first_heading`` is not there. Other sections are kept; the file is replaced atomically."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nEvery table says the command that made it.\n"
    if first_heading in text:
        start = text.index(first_heading)
        after = text.index(last_heading or first_heading, start)
        end = text.find("\n## ", after + len(last_heading or first_heading))
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + section.rstrip("\n") + "\n"
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        f.write(text)
