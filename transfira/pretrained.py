"""The predictors shipped in ``pretrained_weights/``: one per encoder, found by the encoder file's SHA-256.

Each shipped predictor is ``<name>.pt`` (a checkpoint, here heads only: it runs on the user's own,
unmodified encoder file) with its model card ``<name>.md``, whose line ``encoder sha256: `<hex>` ``
names the exact encoder file it was trained on.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import TransfiraError

PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained_weights"
_SHA_LINE = re.compile(r"encoder sha256:\s*`?([0-9a-f]{64})`?", re.IGNORECASE)
_ENCODER_LINE = re.compile(r"encoder file:\s*`?([^`\n]+)`?", re.IGNORECASE)


@dataclass(frozen=True)
class Shipped:
    """One shipped predictor: its checkpoint, model card, and the encoder it belongs to."""

    checkpoint: Path
    card: Path
    encoder_sha256: str
    encoder_name: str


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_predictors(folder: str | Path | None = None) -> list[Shipped]:
    """Every ``<name>.pt`` in ``folder`` (default ``pretrained_weights/``) whose card ``<name>.md`` names
    an encoder SHA-256."""
    found = []
    for card in sorted(Path(folder or PRETRAINED_DIR).glob("*.md")):
        text = card.read_text(encoding="utf-8")
        sha, name = _SHA_LINE.search(text), _ENCODER_LINE.search(text)
        if sha and card.with_suffix(".pt").is_file():
            found.append(Shipped(card.with_suffix(".pt"), card, sha.group(1).lower(),
                                 name.group(1).strip() if name else "?"))
    return found


def find_pretrained(model_path: str | Path, folder: str | Path | None = None) -> Shipped:
    """The shipped predictor trained on exactly this encoder file; otherwise a one-line error listing
    the shipped predictors and their encoders."""
    if not Path(model_path).is_file():
        raise TransfiraError(f"encoder not found: {model_path} (model_path)")
    sha = file_sha256(model_path)
    shipped = shipped_predictors(folder)
    for item in shipped:
        if item.encoder_sha256 == sha:
            return item
    listing = "; ".join(f"{s.checkpoint.name} for {s.encoder_name} (sha256 {s.encoder_sha256[:12]}...)"
                        for s in shipped) or "none"
    raise TransfiraError(f"no shipped predictor for {model_path} (sha256 {sha[:12]}...); shipped in "
                         f"{folder or PRETRAINED_DIR}: "
                         f"{listing}. Give a trained checkpoint (--checkpoint) or use one of those encoder files")
