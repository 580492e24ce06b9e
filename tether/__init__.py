"""tether: aligning language models with human feedback.

Kept import-light on purpose: `import tether` must not pull in transformers, so the CLI's
`--help` is instant and the maths modules can be imported on their own.
"""

__version__ = "0.1.0"
