"""The fixtures of tests/cli/support.py, for every test here."""

from .support import data_dir, isolated_env, ready

__all__ = ["data_dir", "isolated_env", "ready"]
