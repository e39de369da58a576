"""The attention runtime: kernels, backend policy and the varlen engine (torch only, no transformers)."""
