"""The v2 training corpus: the standard library plus the Python sources of every package that
requirements.lock installed when pycoder-v2 was trained (frozen in corpus_v2_sources.txt),
deduplicated by content and split by file.

Everything comes from the machine's own Python installation (the stdlib) and the project's
pinned virtual environment, so the corpus is rebuilt offline and, for the same Python version and
the same installed versions, identically (a differing version is an error, not other data).

- **Split.** By file, with the hash rule of v1 (`corpus.SourceFile.split`, 5% held out): the
  stdlib keeps v1's relative paths, so every file pycoder-5m held out is held out here too, and the
  two models are compared on the same held-out text. Package files are keyed `site/<dist>/<path>`.
- **Deduplication.** By sha256 of the text. Where copies of one text fall on both sides of the
  split, the held-out copy is kept and the training copies are dropped, so no held-out text is
  trained on.
- **Filtering.** Files that are not UTF-8, are over 1 MB, or look generated (a mean line length over
  120 characters, or a line over 5,000 characters) are left out: they are tables, not code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from corpus import SourceFile, pydoc_topics, stdlib_files

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
MAX_MEAN_LINE = 120
MAX_LINE = 5_000


@dataclass(frozen=True)
class Source:
    """One source of the corpus: the stdlib, or one distribution from requirements.lock."""

    name: str
    version: str
    licence: str


SOURCES_FILE = Path(__file__).resolve().parent / "corpus_v2_sources.txt"


def locked_distributions(lock: Path = SOURCES_FILE) -> list[str]:
    """The corpus's distributions; each must be installed at its listed version."""
    names = []
    for line in lock.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==")
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                raise SystemExit(f"corpus: {name} is not installed (make venv installs requirements.lock)") from None
            if installed.split("+")[0] != version.split("+")[0]:
                raise SystemExit(f"corpus: {name} {installed} is installed, the corpus was built from {version}")
            names.append(name)
    return sorted(names, key=str.lower)


def licence_family(dist: metadata.Distribution) -> str:
    """A short licence family from the distribution's metadata (SPDX expression or classifiers)."""
    md = dist.metadata
    expr = md.get("License-Expression")
    text = expr or ""
    if not text:
        classifiers = [c for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
        text = " ".join(c.split("::")[-1].strip() for c in classifiers) or (md.get("License") or "")
    text = text.strip()
    families = [("Apache", "Apache-2.0"), ("BSD", "BSD"), ("MIT", "MIT"), ("PSF", "PSF"),
                ("Python Software Foundation", "PSF"), ("MPL", "MPL-2.0"), ("Mozilla", "MPL-2.0"),
                ("LGPL", "LGPL"), ("GPL", "GPL"), ("ISC", "ISC"), ("HPND", "HPND"),
                ("Unlicense", "Unlicense"), ("PIL", "HPND")]
    found = sorted({fam for key, fam in families if key.lower() in text.lower()})
    if found:
        return " / ".join(found)
    first = text.splitlines()[0][:40] if text else ""
    return first or "unknown"


def _looks_generated(text: str) -> bool:
    lines = text.splitlines() or [""]
    return (sum(len(x) for x in lines) / len(lines) > MAX_MEAN_LINE
            or max(len(x) for x in lines) > MAX_LINE)


def distribution_files(name: str) -> tuple[Source, list[SourceFile]]:
    dist = metadata.distribution(name)
    src = Source(dist.metadata["Name"], dist.version, licence_family(dist))
    out: list[SourceFile] = []
    for f in sorted(dist.files or [], key=str):
        p = str(f)
        if not p.endswith(".py") or ".dist-info/" in p or "__pycache__" in p:
            continue
        path = Path(dist.locate_file(f))
        try:
            if path.stat().st_size > MAX_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip() and not _looks_generated(text):
            out.append(SourceFile(f"site/{src.name}/{p}", text))
    return src, out


def corpus_v2() -> tuple[dict[str, list[SourceFile]], dict[str, Source], dict[str, str]]:
    """(split files, sources by name, source name of each relpath)."""
    import platform

    sources = {"stdlib": Source("stdlib", platform.python_version(), "PSF")}
    files: list[tuple[str, SourceFile]] = [("stdlib", f) for f in stdlib_files() + pydoc_topics()]
    for name in locked_distributions():
        try:
            src, fs = distribution_files(name)
        except metadata.PackageNotFoundError:
            continue
        if fs:
            sources[src.name] = src
            files.extend((src.name, f) for f in fs)

    # Deduplicate by content; a held-out copy wins so that no held-out text is also trained on.
    by_hash: dict[str, tuple[str, SourceFile]] = {}
    for source, f in sorted(files, key=lambda sf: (sf[1].split != "heldout", sf[1].relpath)):
        h = hashlib.sha256(f.text.encode()).hexdigest()
        by_hash.setdefault(h, (source, f))
    split: dict[str, list[SourceFile]] = {"train": [], "heldout": []}
    origin: dict[str, str] = {}
    for source, f in sorted(by_hash.values(), key=lambda sf: sf[1].relpath):
        split[f.split].append(f)
        origin[f.relpath] = source
    return split, sources, origin




def describe(split, sources, origin, counts: dict[str, dict[str, int]]) -> list[dict]:
    """One row per source: licence, files and tokens on each side (for the model card)."""
    rows = []
    for name, src in sorted(sources.items(), key=lambda kv: (-counts.get(kv[0], {}).get("train_tokens", 0), kv[0])):
        c = counts.get(name, {})
        rows.append({"source": name, "version": src.version, "licence": src.licence,
                     "train_files": c.get("train_files", 0), "train_tokens": c.get("train_tokens", 0),
                     "heldout_files": c.get("heldout_files", 0), "heldout_tokens": c.get("heldout_tokens", 0)})
    return rows
