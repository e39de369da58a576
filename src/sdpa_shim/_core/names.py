"""Names shared by every layer: the transformers modules the shim watches, the flash implementations.

One spelling per name, so a module that patches, one that decides and ``doctor`` cannot drift apart.
Stdlib only, nothing at import: it is on the path of every ``import sdpa_shim``.
"""

from __future__ import annotations

#: The transformers modules whose import installs the shim's integration units (``_integration.units``).
MODELING_UTILS = "transformers.modeling_utils"
DYNAMIC_MODULE_UTILS = "transformers.dynamic_module_utils"
IMPORT_UTILS = "transformers.utils.import_utils"
FLASH_UTILS = "transformers.modeling_flash_attention_utils"
#: Continuous batching (5.x): its set-up and its automatic switch to flash attention.
CONTINUOUS_API = "transformers.generation.continuous_batching.continuous_api"

#: The implementation the shim serves, and what a model kept on transformers' flash path reads.
FLASH_ATTENTION_2 = "flash_attention_2"
#: The import name of flash-attn 2 (the stand-in answers it).
FLASH_ATTN = "flash_attn"
#: The package transformers imports remote code (``trust_remote_code``) under.
REMOTE_PREFIX = "transformers_modules."
