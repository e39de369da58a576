"""The ways a flash request reaches transformers, and the assertions every entry-point test makes.

Shared by tests/integration/test_entry_points.py (4.54+), test_legacy_bands.py (4.36-4.53) and others.
"""

from __future__ import annotations

import json
import logging

import pytest
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import sdpa_shim
from helpers.expect import TRANSFORMERS


def without_shim(build):
    """Run ``build`` with the shim off: transformers' own behaviour, for references and errors."""
    sdpa_shim.deactivate()
    try:
        return build()
    finally:
        sdpa_shim.activate()


def reference(directory, implementation="sdpa", model_class=AutoModelForCausalLM):
    return without_shim(lambda: model_class.from_pretrained(directory, attn_implementation=implementation))


def assert_one_warning(records, model: str, requested: str, chosen: str, reason: str) -> None:
    """Exactly one WARNING, naming all four, and exactly that decision recorded."""
    warnings = records(logging.WARNING)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"{model} requested {requested}; using {chosen} instead: {reason}" in warnings[0].getMessage()
    assert [(d.model, d.requested, d.chosen) for d in sdpa_shim.decisions()] == [(model, requested, chosen)]


def load_direct(directory):
    return LlamaForCausalLM.from_pretrained(directory, attn_implementation="flash_attention_2")


def load_auto(directory):
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="flash_attention_2")


#: The config.json keys a release reads a request from (read in each release's configuration_utils.py;
#: tests/integration/test_config_json_keys.py checks both on every release of the matrix):
#: - ``"_attn_implementation"`` (private) reaches ``PretrainedConfig.__init__``'s setattr loop on 4.36-5.24;
#:   5.25 lists it in ``ignored_keys`` ("hub configs should use the public field"): it does nothing there.
#: - ``"attn_implementation"`` (public) is an ``__init__`` argument on every release, but ``from_dict`` on
#:   4.36-5.3 overwrites it with from_pretrained's keyword (None when none is given); read from 5.4 on.
PRIVATE_KEY_READ = Version("5.25") > TRANSFORMERS
PUBLIC_KEY_READ = Version("5.4") <= TRANSFORMERS
#: The key a config.json request is written with: the private one where it is still read (it also beats
#: the keyword there), the public one from 5.25.
CONFIG_JSON_KEY = "_attn_implementation" if PRIVATE_KEY_READ else "attn_implementation"


def write_config_request(directory, value: str = "flash_attention_2", key: str = CONFIG_JSON_KEY) -> None:
    """Put an attention request into ``directory/config.json`` under ``key``, as a model repo would."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config[key] = value
    config_file.write_text(json.dumps(config))


def load_config_json(directory):
    """A request in config.json, under the key this release reads (CONFIG_JSON_KEY)."""
    write_config_request(directory)
    return AutoModelForCausalLM.from_pretrained(directory)


def load_with_config_object(directory):
    if Version("4.37") > TRANSFORMERS:
        pytest.skip(
            "4.36 passes attn_implementation with config= on to __init__: TypeError (transformers #28038)"
        )
    config = transformers.AutoConfig.from_pretrained(directory)
    return LlamaForCausalLM.from_pretrained(directory, config=config, attn_implementation="flash_attention_2")
