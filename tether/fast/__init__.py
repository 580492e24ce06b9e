"""The fast path of the rollout: a KV-cache decode engine, its fused C++ kernels, and the
malloc the `tether` command preloads. Skip on a first read: `tether.rollout.generation.generate`
samples from the same distribution through Hugging Face `generate` where the engine does not
apply.
"""
