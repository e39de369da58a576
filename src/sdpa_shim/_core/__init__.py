"""Pure decisions and shared facts: names, versions, settings, flash-attn detection, the SDPA probe, the
policy, the decision log, faults.

Nothing here imports transformers, nor torch at module level. Every layer above depends on this one.
"""
