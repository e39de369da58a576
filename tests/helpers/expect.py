"""What a flash request becomes on the transformers release under test, read without importing it."""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

from sdpa_shim._core.policy import FLASH_PATH

#: The transformers release under test (its metadata: transformers is not imported).
TRANSFORMERS = Version(version("transformers"))
#: From 4.56 a flash request flash-attn cannot serve keeps transformers' flash path on PyTorch kernels
#: (tests/integration/test_flash_paths.py); before, it is downgraded to sdpa.
SERVES_FLASH_PATH = Version("4.56") <= TRANSFORMERS
#: What the config of a model with flash and SDPA support reads after a flash request, and the decision.
EXPECTED_IMPLEMENTATION = "flash_attention_2" if SERVES_FLASH_PATH else "sdpa"
EXPECTED_CHOSEN = FLASH_PATH if SERVES_FLASH_PATH else "sdpa"
#: In 4.36-4.54 an installed-but-broken flash-attn breaks ``from transformers import LlamaForCausalLM``
#: itself (tests/integration/test_broken_install.py); 4.55 prompts at the first flash forward instead.
IMPORT_BREAKS = Version("4.55") > TRANSFORMERS
