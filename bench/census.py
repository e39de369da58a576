"""Which SDPA kernel each attention call of a model actually lands on (plain sdpa vs the shim).

Wraps ``torch.nn.functional.scaled_dot_product_attention`` while a short generate (equal-length
rows, then left-padded rows) and a padded prefill run, and asks torch which backend it would pick
for each call (``torch._fused_sdp_choice``, under the flags in force at that moment). The first
masked decode call is then replayed under each single backend, since that call type is where the
backends differ most.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import torch
from _common import attempt, free, loop_time

NAMES = {-1: "none", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def run(device: str, quick: bool) -> dict[str, Any]:
    from e2e import build

    if device != "cuda" and not quick:
        return {"note": "census needs CUDA (torch picks backends per device)"}
    counts: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
    captured: dict[str, Any] = {}
    state = {"variant": "", "stage": ""}
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        choice = torch._fused_sdp_choice(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
        phase = (
            "decode"
            if query.shape[-2] == 1 or (attn_mask is not None and attn_mask.shape[-2] == 1)
            else "prefill"
        )
        mask = "mask" if attn_mask is not None else "no mask"
        counts[
            (state["variant"], state["stage"], f"{phase}, {mask}", NAMES.get(int(choice), str(choice)))
        ] += 1
        if phase == "decode" and attn_mask is not None and "decode" not in captured:
            captured["decode"] = dict(
                q=query.detach().clone(),
                k=key.detach().clone(),
                v=value.detach().clone(),
                mask=attn_mask.clone(),
                scale=scale,
                enable_gqa=enable_gqa,
                mask_stride=list(attn_mask.stride()),
                mask_shape=list(attn_mask.shape),
                mask_dtype=str(attn_mask.dtype),
                q_stride=list(query.stride()),
                k_shape=list(key.shape),
            )
        return real(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )

    from e2e import generate_once

    out: dict[str, Any] = {}
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        for variant in ("sdpa", "shim"):
            os.environ.pop("SDPA_SHIM_BACKEND", None)
            model = build(variant, device, quick)
            state["variant"] = variant
            for call in (1, 2):
                state["stage"] = f"generate #{call}"
                generate_once(model, device, [300] * 8, 4)
                state["stage"] = f"padded generate #{call}"
                generate_once(model, device, [100 * (i + 1) for i in range(8)], 4)
            del model
            free(device)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    out["counts"] = [
        dict(variant=v, stage=s, call=c, backend=b, n=n) for (v, s, c, b), n in sorted(counts.items())
    ]
    dec = captured.get("decode")
    if dec:
        out["masked_decode_call"] = {k: v for k, v in dec.items() if not isinstance(v, torch.Tensor)}
        out["masked_decode_call"]["mask_contiguous"] = bool(dec["mask"].is_contiguous())
        from torch.nn.attention import SDPBackend, sdpa_kernel

        replay = []
        for label, backends, contiguous in (
            ("efficient", [SDPBackend.EFFICIENT_ATTENTION], False),
            ("efficient, mask made contiguous", [SDPBackend.EFFICIENT_ATTENTION], True),
            ("cudnn", [SDPBackend.CUDNN_ATTENTION], False),
            ("math", [SDPBackend.MATH], False),
            (
                "flash+efficient+math (auto decode)",
                [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                False,
            ),
        ):
            rec: dict[str, Any] = {"replay": label}

            def measure(backends: Any = backends, contiguous: bool = contiguous) -> dict[str, Any]:
                mask = dec["mask"].contiguous() if contiguous else dec["mask"]
                with sdpa_kernel(backends):
                    choice = torch._fused_sdp_choice(
                        dec["q"],
                        dec["k"],
                        dec["v"],
                        mask,
                        0.0,
                        False,
                        scale=dec["scale"],
                        enable_gqa=dec["enable_gqa"],
                    )

                    def call() -> None:
                        real(
                            dec["q"],
                            dec["k"],
                            dec["v"],
                            attn_mask=mask,
                            scale=dec["scale"],
                            enable_gqa=dec["enable_gqa"],
                        )

                    seconds = loop_time(call, device, calls=200)
                return {"chosen": NAMES.get(int(choice), str(choice)), "us_per_call": seconds * 1e6}

            replay.append(attempt(rec, device, measure))
        out["masked_decode_replay"] = replay
    return out
