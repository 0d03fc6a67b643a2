"""The offline training corpus: the running interpreter's standard-library sources.

Every machine that runs Python has this text, so the reference decoder can be trained and
retrained anywhere without a download. Files are split into train / held-out *by file*
(a hash of the path relative to the stdlib root), so held-out text is never seen in training
and the split does not depend on directory listing order.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EOT = "<|endoftext|>"

# Test suites are huge, repetitive and full of deliberately odd code; turtledemo is GUI demos;
# encodings/ is mostly generated codec tables. Leaving them out keeps the corpus "ordinary
# library Python". pydoc_data is added as its individual topics (pydoc_topics).
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "turtledemo",
                  "encodings", "pydoc_data", "__pycache__"}
HELDOUT_PERCENT = 5


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    text: str

    @property
    def split(self) -> str:
        digest = hashlib.sha256(self.relpath.encode()).digest()
        return "heldout" if digest[0] * 100 // 256 < HELDOUT_PERCENT else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    """All readable .py files under the stdlib (tests excluded), sorted by relative path."""
    root = root or stdlib_root()
    out: list[SourceFile] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append(SourceFile(rel.as_posix(), text))
    return out


def pydoc_topics() -> list[SourceFile]:
    """The interpreter's help topics (English prose about Python) as extra training text."""
    from pydoc_data.topics import topics

    return [SourceFile(f"pydoc_data/topics/{k}", v) for k, v in sorted(topics.items())]


def corpus() -> dict[str, list[SourceFile]]:
    files = stdlib_files() + pydoc_topics()
    split: dict[str, list[SourceFile]] = {"train": [], "heldout": []}
    for f in files:
        split[f.split].append(f)
    return split
