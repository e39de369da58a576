"""Which config.json key carries an attention request, per release, with and without the shim.

Read from each release's ``configuration_utils.py`` (see ``loading.PRIVATE_KEY_READ`` / ``PUBLIC_KEY_READ``):
the private ``"_attn_implementation"`` is honoured on 4.36-5.24 and does nothing on 5.25+ (it is in
``PreTrainedConfig.__init__``'s ``ignored_keys``); the public ``"attn_implementation"`` is read from 5.4 on
(4.36-5.3's ``from_dict`` overwrites it with from_pretrained's keyword, None). A key the release does not
read is no request: the shim must then do nothing, and a key it reads is a request the shim serves like
any other entry point. Both halves run on every release, so each can fail where the release changes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import sdpa_shim
from helpers.expect import EXPECTED_CHOSEN, EXPECTED_IMPLEMENTATION, TRANSFORMERS
from helpers.loading import (
    PRIVATE_KEY_READ,
    PUBLIC_KEY_READ,
    assert_one_warning,
    without_shim,
    write_config_request,
)
from helpers.models import logits

KEYS = [
    pytest.param("_attn_implementation", PRIVATE_KEY_READ, id="private"),
    pytest.param("attn_implementation", PUBLIC_KEY_READ, id="public"),
]


def _default_load(directory):
    """What this release loads with no request at all, without the shim: the reference for an unread key."""
    return without_shim(lambda: AutoModelForCausalLM.from_pretrained(directory))


@pytest.mark.parametrize(("key", "read"), KEYS)
def test_config_json_key_with_the_shim(key: str, read: bool, tiny_llama, shim_records) -> None:
    """A read key is served like any request (one WARNING); an unread key leaves the default untouched."""
    default = _default_load(tiny_llama)
    write_config_request(tiny_llama, key=key)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if read:
        assert model.config._attn_implementation == EXPECTED_IMPLEMENTATION
        assert_one_warning(
            shim_records,
            "LlamaForCausalLM",
            "flash_attention_2",
            EXPECTED_CHOSEN,
            "flash-attn is not installed",
        )
    else:
        assert model.config._attn_implementation == default.config._attn_implementation != "flash_attention_2"
        assert shim_records() == [], [r.getMessage() for r in shim_records()]
        assert sdpa_shim.decisions() == []
    torch.testing.assert_close(logits(model), logits(default), rtol=0, atol=0)


@pytest.mark.parametrize(("key", "read"), KEYS)
def test_config_json_key_without_the_shim(key: str, read: bool, tiny_llama) -> None:
    """transformers' own reading of the key: a read key is a flash request flash-attn cannot serve here
    (an error), an unread key loads the default. This is what the table in loading.py claims per release."""
    default = _default_load(tiny_llama)
    write_config_request(tiny_llama, key=key)
    if read:
        with pytest.raises((ImportError, ValueError)) as info:
            without_shim(lambda: AutoModelForCausalLM.from_pretrained(tiny_llama))
        assert "flash" in str(info.value).lower(), (TRANSFORMERS, str(info.value))
    else:
        model = without_shim(lambda: AutoModelForCausalLM.from_pretrained(tiny_llama))
        assert model.config._attn_implementation == default.config._attn_implementation != "flash_attention_2"
