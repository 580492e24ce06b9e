"""The rule reward both sides of the GRPO benchmark optimise: 1 for an answer ending in '!'."""

import re

_EXCLAIM = re.compile(r"!\s*$")


def exclaim(prompts, responses):
    """tether's signature: prompts and response texts."""
    return [1.0 if _EXCLAIM.search(r) else 0.0 for r in responses]


def exclaim_trl(prompts, completions, **kwargs):
    """TRL's signature: conversational completions are lists of messages."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return exclaim(prompts, texts)
