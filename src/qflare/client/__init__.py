"""The device SDK: enroll with a token, hold a session, seal and open records."""

from __future__ import annotations

from .device import AsyncDeviceClient, DeviceClient, EphemeralPool
from .flow import ServerRejected
from .keystore import DeviceIdentity, KeystoreError

__all__ = [
    "AsyncDeviceClient",
    "DeviceClient",
    "DeviceIdentity",
    "EphemeralPool",
    "KeystoreError",
    "ServerRejected",
]
