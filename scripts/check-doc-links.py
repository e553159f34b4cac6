#!/usr/bin/env python3
"""Check that every relative link in README.md and docs/*.md points at an existing file and,
when it has a #fragment, at a heading of that file (GitHub's anchor rules). Exits 1 on a
broken link. Usage: scripts/check-doc-links.py [files...]"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with their numbers."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, drop punctuation but - and _, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def check(path: Path) -> list[str]:
    errors = []
    for number, line in prose_lines(path):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{number}: {target}"
            if not dest.exists():
                errors.append(f"{where}: no such file")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                errors.append(f"{where}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    return errors


def main() -> int:
    default = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files = [Path(a).resolve() for a in sys.argv[1:]] or default
    errors = [e for f in files for e in check(f)]
    links = sum(len(LINK.findall(line)) for f in files for _, line in prose_lines(f))
    print("\n".join(errors) if errors else f"{len(files)} files, {links} links: all resolve")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
