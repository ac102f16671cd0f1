"""Turn `data.sources` into the sorted list of files to read.

A source is a built-in name (`python-stdlib`), a file, a directory (every
supported file under it, recursively) or a glob (`data/**/*.jsonl`). Files are
sorted by path within each source and sources keep their given order, so the
document order (and with it dedup's "first seen" and every output byte) is the
same on every run. A source that matches nothing is a configuration error:
better to stop before reading than to train on less data than asked for.
Files of a directory or glob that no reader takes (`.pdf`, `.docx`) are
skipped, and returned with the reason so the report can list them.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import sysconfig
from pathlib import Path

from kiln.config import ConfigError
from kiln.data.readers import FORMATS, FileTask, format_of

# Third-party code lives under these inside the stdlib folder; it is not the standard library.
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file a directory or glob source holds that is not read."""

    source: str
    rel: str
    """Path relative to the source root, as a document's meta `path` would be."""
    reason: str


@dataclasses.dataclass
class Resolved:
    tasks: list[FileTask]
    skipped: list[Skipped]


def resolve_sources(sources: list[str], code_sources: list[str] = (), prose_sources: list[str] = ()) -> Resolved:
    """Every file of every source, in deterministic order, each with its content type (`kind`); and the
    files of directory and glob sources that are skipped.

    ConfigError for a source that matches nothing, or a code/prose source that is not in `sources`.
    """
    for key, listed in (("data.code_sources", code_sources), ("data.prose_sources", prose_sources)):
        for i, name in enumerate(listed):
            if name not in sources:
                raise ConfigError(f"{key}[{i}]=`{name}` is not one of data.sources ({', '.join(sources)})")
    out = Resolved([], [])
    for i, source in enumerate(sources):
        tasks, skipped = _resolve(source, f"data.sources[{i}]")
        out.tasks += [dataclasses.replace(t, kind=content_type(t, code_sources, prose_sources)) for t in tasks]
        out.skipped += skipped
    return out


def content_type(task: FileTask, code_sources, prose_sources) -> str:
    """`code` for listed code sources, built-in code sources and code file extensions; else `prose`."""
    if task.source in prose_sources:
        return "prose"
    if task.source in code_sources or task.source in CODE_BUILTINS or task.path.lower().endswith(CODE_EXTS):
        return "code"
    return "prose"


def _resolve(source: str, key: str) -> tuple[list[FileTask], list[Skipped]]:
    if source in BUILTIN:   # a built-in source picks its own files: nothing of it is the user's to miss
        return BUILTIN[source](source), []
    path = Path(source).expanduser()
    if path.is_file():
        if format_of(path.name) is None:
            raise ConfigError(f"{key}: `{source}` has an unsupported extension; supported: {_supported()}")
        return [FileTask(str(path), path.name, source)], []
    if path.is_dir():
        return _directory(path, source, key)
    if any(c in source for c in GLOB_CHARS):
        return _glob(source, key)
    raise ConfigError(_missing_message(source, key, path))


def _python_stdlib(source: str) -> list[FileTask]:
    """The .py files of this interpreter's standard library (not site-packages): code on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels, _ = _walk(root, exts=(".py",), skip_dirs=STDLIB_EXCLUDED_DIRS)
    if not rels:
        raise ConfigError(f"`{source}`: no .py files under {root}; this Python ships without its stdlib sources "
                          "(some minimal images strip them): give files or directories in data.sources instead")
    return [FileTask(str(root / rel), rel, source) for rel in rels]


BUILTIN = {"python-stdlib": _python_stdlib}
CODE_BUILTINS = {"python-stdlib"}
CODE_EXTS = (".py",)


def _directory(root: Path, source: str, key: str) -> tuple[list[FileTask], list[Skipped]]:
    rels, others = _walk(root, exts=tuple(FORMATS), skip_dirs=set())
    if not rels:
        found = sorted(p.name for p in root.iterdir())
        raise ConfigError(f"{key}: directory `{source}` holds no files with a supported extension "
                          f"({_supported()}); its top level has: {_listing(found)}")
    return [FileTask(str(root / rel), rel, source) for rel in rels], [_skipped(source, rel) for rel in others]


def _walk(root: Path, exts: tuple[str, ...], skip_dirs: set[str]) -> tuple[list[str], list[str]]:
    """Relative POSIX paths of files under `root` with one of `exts`, and of the other files; both sorted."""
    rels, others = [], []
    # followlinks=False: a symlinked directory loop cannot hang the walk. Symlinked *files* are listed
    # (a dangling one then reads as an unreadable file, quarantined, rather than vanishing silently).
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        base = Path(dirpath).relative_to(root)
        for f in filenames:
            (rels if f.lower().endswith(exts) else others).append((base / f).as_posix())
    return sorted(rels), sorted(others)


def _glob(pattern: str, key: str) -> tuple[list[FileTask], list[Skipped]]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [m for m in matches if not os.path.isdir(m)]
    readable = [m for m in files if format_of(m)]
    if not readable:
        what = f"only unsupported files or folders: {_listing(matches)}" if matches else "nothing"
        raise ConfigError(f"{key}: glob `{pattern}` matched {what} (from {os.getcwd()}); "
                          f"supported extensions: {_supported()}")
    root = _glob_root(pattern)
    return ([FileTask(m, os.path.relpath(m, root), pattern) for m in readable],
            [_skipped(pattern, os.path.relpath(m, root)) for m in files if not format_of(m)])


def _skipped(source: str, rel: str) -> Skipped:
    suffix = Path(rel).suffix.lower()
    # A long or odd "suffix" (`notes.2024-01-03`) is part of the name, not a type: one reason for all of them,
    # so the report holds one count per file type, not one per file.
    if 1 < len(suffix) <= 10 and suffix[1:].isalnum():
        return Skipped(source, rel, f"unsupported extension {suffix}")
    return Skipped(source, rel, "no file extension")


def _glob_root(pattern: str) -> str:
    """The folder before the first glob character: `data/**/*.jsonl` -> `data`."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = list(itertools.takewhile(lambda part: not any(c in part for c in GLOB_CHARS), parts))
    return str(Path(*fixed)) if fixed else "."


def _missing_message(source: str, key: str, path: Path) -> str:
    parent = path.parent
    if parent.is_dir():
        where = f"{parent}/ has: {_listing(sorted(p.name for p in parent.iterdir()))}"
    else:
        where = f"{parent}/ does not exist either"
    return (f"{key}: `{source}` does not exist (not a file, directory, glob match, or built-in source: "
            f"{', '.join(BUILTIN)}); {where} (cwd: {os.getcwd()})")


def _supported() -> str:
    return " ".join(FORMATS)


def _listing(names: list[str], limit: int = 10) -> str:
    if not names:
        return "nothing"
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
