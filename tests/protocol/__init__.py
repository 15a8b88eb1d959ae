"""Tests of the sans-I/O protocol core (``qflare.protocol``).

A package, so that these modules get names of their own (``protocol.test_handshake``) and can
never clash with a same-named test module elsewhere under ``tests/``.
"""
