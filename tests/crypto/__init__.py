"""Known-answer and contract tests of QFLARE's crypto layer (``qflare.crypto``).

Every vector goes through QFLARE's registry objects (``crypto.kem(name)`` and friends), never
through pyca/cryptography directly: pyca itself passes these vectors (see
``tests/vectors/PROVENANCE.md``), so a failure here points at QFLARE's wrapper.

A package, so that these modules get names of their own and never clash with a same-named
test module elsewhere under ``tests/``.
"""
