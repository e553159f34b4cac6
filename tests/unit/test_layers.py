"""The import rule of docs/design.md: protocol cores do no I/O.

Every module of bridge/sip, bridge/rtp, bridge/audiosocket and bridge/forks except the I/O
shells (server, ingest, endpoint, and rtp/sender: the `callscribe send` client), plus
bridge/events.py, bridge/limits.py and codecs/, must not import asyncio or socket, directly
or through any callscribe module it imports. Read from the source with `ast`, so the check
needs no import of the code it checks.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "callscribe"
FORBIDDEN = frozenset({"asyncio", "socket"})
PROTOCOLS = ("sip", "rtp", "audiosocket", "forks")
SHELLS = frozenset({"server", "ingest", "endpoint", "sender"})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def core_modules() -> list[str]:
    paths: list[Path] = []
    for protocol in PROTOCOLS:
        paths += [p for p in (PACKAGE / "bridge" / protocol).glob("*.py") if p.stem not in SHELLS]
    paths += [PACKAGE / "bridge" / "events.py", PACKAGE / "bridge" / "limits.py"]
    paths += list((PACKAGE / "codecs").glob("*.py"))
    return sorted(module_name(p) for p in paths)


@cache
def imports_of(name: str) -> frozenset[str]:
    """Absolute names of the modules `name` imports (each `from a.b import c` counts a.b and,
    when it is a module, a.b.c), TYPE_CHECKING blocks excluded: they do not run."""
    path = module_path(name)
    assert path is not None, name
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return frozenset(found)


def io_chain(name: str, seen: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The import chain from `name` to asyncio or socket, or None when there is none."""
    chain = (*seen, name)
    for imported in sorted(imports_of(name)):
        if imported.split(".")[0] in FORBIDDEN:
            return (*chain, imported)
        if imported.startswith("callscribe") and imported not in chain and module_path(imported):
            found = io_chain(imported, chain)
            if found:
                return found
    return None


def test_the_rule_sees_every_core() -> None:
    cores = core_modules()
    # The check must look at the packages it guards, or it passes for the wrong reason.
    for expected in (
        "callscribe.bridge.sip.uas",
        "callscribe.bridge.sip.session",
        "callscribe.bridge.rtp.receiver",
        "callscribe.bridge.rtp.admission",
        "callscribe.bridge.audiosocket.parser",
        "callscribe.bridge.forks.mediastream",
        "callscribe.bridge.events",
        "callscribe.codecs.g711",
    ):
        assert expected in cores
    assert not any(name.rsplit(".", 1)[-1] in SHELLS for name in cores)


def test_the_rule_catches_a_transitive_import() -> None:
    # The shells do reach asyncio; the checker must find that path (else it could never fail).
    assert io_chain("callscribe.bridge.rtp.ingest") is not None
    assert io_chain("callscribe.bridge.sip.server") is not None


@pytest.mark.parametrize("module", core_modules())
def test_protocol_cores_do_no_io(module: str) -> None:
    chain = io_chain(module)
    assert chain is None, f"{module} reaches I/O: {' → '.join(chain or ())}"
