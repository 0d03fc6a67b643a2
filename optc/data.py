"""Evaluation text for compile-time verification and benchmarks (models/data/, see its README)."""

from __future__ import annotations

import json
from pathlib import Path

from optc.errors import OptcError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "models" / "data"
DEFAULT_EVAL_TEXT = DATA_DIR / "heldout.jsonl"


def read_texts(path: Path | None) -> list[str]:
    """Documents from a .jsonl file ({"text": ...} per line) or a plain .txt file (one document)."""
    path = Path(path) if path else DEFAULT_EVAL_TEXT
    if not path.is_file():
        raise OptcError(f"{path}: evaluation text not found (pass --eval-text FILE)")
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptcError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise OptcError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        return texts
    return [content]
