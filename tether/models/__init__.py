"""Models: loading LMs and tokenizers (local dirs, hub ids, GGUF, the embedded model), LoRA,
reward models (a backbone with a scalar head), and the attention kernel training passes use.
"""
