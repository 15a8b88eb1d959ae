"""QFLARE: post-quantum key exchange and key management for federated-learning fleets."""

__version__ = "0.1.0"
