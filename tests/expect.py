"""What a flash request becomes on the transformers release under test, read without importing it."""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

from sdpa_shim._core.policy import FLASH_PATH

#: From 4.56 a flash request flash-attn cannot serve keeps transformers' flash path on PyTorch kernels
#: (tests/test_flash_paths.py); before, it is downgraded to sdpa.
SERVES_FLASH_PATH = Version(version("transformers")) >= Version("4.56")
#: What the config of a model with flash and SDPA support reads after a flash request, and the decision.
EXPECTED_IMPLEMENTATION = "flash_attention_2" if SERVES_FLASH_PATH else "sdpa"
EXPECTED_CHOSEN = FLASH_PATH if SERVES_FLASH_PATH else "sdpa"
