"""A data key ring for tests that build audit stores in this process (no keystore needed).

Tests that run the gateway's command line use gateway.testing.provision_data_keys instead: the
CLI reads the ring where the config points.
"""

from __future__ import annotations

from empsecrets.fieldcrypt import DataKeyRing, FieldCipher

CIPHER = FieldCipher(DataKeyRing.generate())
