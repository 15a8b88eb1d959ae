"""``qflare.protocol`` and ``qflare.crypto`` are sans-I/O: they import no network, database,
process or event-loop module, directly or through anything they import.

Two checks, because each misses what the other sees: the AST walk names the offending line
even for an import that only runs in a branch the tests never take, and the subprocess sees
transitive imports (a dependency that pulls in ``socket``) and imports made by ``importlib``.
Reading the clock is not checked here; the protocol's callers pass time in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import qflare

SRC = Path(qflare.__file__).resolve().parent
PACKAGES = ("protocol", "crypto")

# Top-level names of modules that do I/O (network, databases, processes, event loops).
FORBIDDEN = frozenset(
    {
        "socket", "_socket", "ssl", "_ssl", "select", "selectors", "socketserver",
        "http", "urllib", "urllib3", "ftplib", "smtplib", "xmlrpc",
        "asyncio", "anyio", "trio",
        "sqlite3", "_sqlite3", "asyncpg", "aiosqlite", "psycopg", "psycopg2", "redis",
        "subprocess", "_posixsubprocess", "multiprocessing", "concurrent",
        "requests", "httpx", "aiohttp", "fastapi", "starlette", "uvicorn",
    }
)  # fmt: skip
# Inside QFLARE, the sans-I/O core may only lean on itself and the error tree.
ALLOWED_QFLARE = ("qflare.crypto", "qflare.errors", "qflare.protocol")
# Only qflare.crypto imports a crypto library (STYLE.md): the protocol goes through it.
CRYPTO_LIBRARIES = frozenset({"cryptography", "pqcrypto", "hashlib", "hmac", "_hashlib"})


def _sources(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``, relative ones resolved,
    and ``importlib.import_module`` / ``__import__`` calls with a literal name or prefix."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            # "from qflare import crypto" imports qflare.crypto: report each name under its
            # module, so the name decides (it may be a submodule) and not only the package.
            if node.level:  # relative: level 1 is this package, 2 its parent, ...
                parts = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value
                elif isinstance(arg, ast.JoinedStr) and arg.values:
                    first = arg.values[0]
                    if isinstance(first, ast.Constant) and isinstance(first.value, str):
                        yield node.lineno, first.value.rstrip(".")


def _top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_ast_imports_no_io_module(package: str) -> None:
    files = _sources(package)
    assert files, f"no sources under {SRC / package}"
    bad = [
        f"{path.relative_to(SRC.parent)}:{line}: {module}"
        for path in files
        for line, module in _imports(path)
        if _top(module) in FORBIDDEN
        or (_top(module) == "qflare" and not module.startswith(ALLOWED_QFLARE))
    ]
    assert not bad, "I/O (or non-core QFLARE) imports in the sans-I/O core:\n" + "\n".join(bad)


def test_ast_protocol_imports_no_crypto_library() -> None:
    bad = [
        f"{path.relative_to(SRC.parent)}:{line}: {module}"
        for path in _sources("protocol")
        for line, module in _imports(path)
        if _top(module) in CRYPTO_LIBRARIES
    ]
    assert not bad, "qflare.protocol must use qflare.crypto:\n" + "\n".join(bad)


def test_ast_walk_sees_imports() -> None:
    """The walk must find what is there, or the tests above could pass on nothing."""
    found = {m for p in _sources("crypto") for _, m in _imports(p)}
    assert {
        "cryptography.hazmat.primitives.asymmetric.mlkem",
        "qflare.errors.InvalidKey",
        "pqcrypto.kem",  # importlib.import_module(f"pqcrypto.kem.{name}")
        "qflare.crypto.labels",  # from qflare.crypto import labels
    } <= found
    found = {m for p in _sources("protocol") for _, m in _imports(p)}
    assert "qflare.crypto" in found  # from qflare import crypto


_PROBE = """
import importlib, json, pkgutil, sys
import qflare.crypto, qflare.protocol
for pkg in (qflare.crypto, qflare.protocol):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
qflare.crypto.available()  # exercise every algorithm, pqcrypto's lazy imports included
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_the_core_loads_no_io_module() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=False, timeout=120
    )
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
    assert "qflare.protocol.handshake" in loaded and "qflare.crypto.kem" in loaded
    bad = sorted(m for m in loaded if _top(m) in FORBIDDEN)
    assert not bad, f"importing qflare.protocol and qflare.crypto loaded: {bad}"
    outside = sorted(
        m
        for m in loaded
        if _top(m) == "qflare" and m != "qflare" and not m.startswith(ALLOWED_QFLARE)
    )
    assert not outside, f"the sans-I/O core pulled in: {outside}"
