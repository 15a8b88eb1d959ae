"""The ``qflare`` operator command (typer + rich); see docs/CLI.md.

``main`` is the console-script entry point and ``app`` the typer application (for tests and
for embedding). The command is a thin layer over ``qflare.runtime``, ``KeyManager`` and the
store: it holds no policy of its own.
"""

from __future__ import annotations

from qflare.cli.app import app, main

__all__ = ["app", "main"]
