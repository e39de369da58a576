"""Remote-code models that import flash_attn themselves (placeholder: nothing patched yet)."""

from __future__ import annotations

from types import ModuleType


def install(dynamic_module_utils: ModuleType) -> None:
    """Patch ``transformers.dynamic_module_utils`` (idempotent)."""


def uninstall() -> None:
    """Undo ``install``."""
