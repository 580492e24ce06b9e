"""Demo tasks: prompts, a gold judge, and the simulated annotator who ranks answers.

A task is the world the demo pretends to be in. Its gold judge stands for the true human
preference that a real project can only sample; the annotator sees the gold score through
noise (and, if asked, a taste for long answers) and ranks K answers; the reward model learns
from those rankings only. The gold score is logged throughout but never trained on, so the
gap between the reward model's score and the gold one is the overoptimisation a real RLHF run
cannot see directly (Gao et al. 2022).

Add a task the same way the built-ins are added: build a `Task` and `register_task` it, or
point `tether demo --task my_tasks.py:my_task` at a module attribute holding one.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tether.errors import TetherError
from tether.rewards import import_target, load_function


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    # prompts(seed) -> every prompt of the task, deterministic; the demo splits them
    prompts: Callable[[int], list[str]]
    # "module:function" with f(prompts, responses) -> list[float]; a spec, not a callable, so
    # the PPO config that logs it as its gold judge stays a plain, saveable file
    gold: str
    max_new_tokens: int = 32
    tau: float = 0.1  # annotator noise, in gold units
    gold_range: tuple[float, float] = (-1.0, 1.0)  # for plot axes


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """A registered task by name, or `module:attr` / `file.py:attr` naming a Task."""
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        task = _load_attr(name)
        if isinstance(task, Task):
            return task
        raise TetherError(
            f"--task {name}: is a {type(task).__name__}, not a tether.tools.tasks.Task"
        )
    raise TetherError(f"unknown task {name!r}; registered: {', '.join(sorted(TASKS))}")


def _load_attr(spec: str):
    target, _, attr = spec.rpartition(":")
    module = import_target(target, "task module")
    if not hasattr(module, attr):
        raise TetherError(f"--task {spec}: {target} has no attribute {attr!r}")
    return getattr(module, attr)


def gold_function(task: Task) -> Callable[[list[str], list[str]], list[float]]:
    return load_function(task.gold)


# --------------------------------------------------------------------------- annotator


def annotator_utilities(
    gold: torch.Tensor, lengths: torch.Tensor, length_bias: float = 0.0
) -> torch.Tensor:
    """u = g + length_bias · words: what the annotator values. [K], [K] -> [K].

    length_bias > 0 is an annotator who also likes longer answers (per word, in gold units):
    a reward model learns that taste, and PPO then buys length instead of gold.
    """
    return gold.float() + length_bias * lengths.float()


def annotator_ranking(utilities: torch.Tensor, tau: float, generator: torch.Generator) -> list[int]:
    """Indices best first, sorted by u_i/τ + Gumbel noise (Plackett-Luce sampling).

    The difference of two standard Gumbels is standard logistic, so every pair comes out in
    the Bradley-Terry order P(a above b) = σ((u_a − u_b)/τ): the ranking is a sample of the
    very model the reward model fits. τ → 0 is a noiseless annotator.
    """
    uniform = torch.rand(utilities.shape, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-12)))
    keys = utilities.double() / max(tau, 1e-9) + gumbel
    return torch.argsort(keys, descending=True).tolist()


# --------------------------------------------------------------------------- sentiment

_ADJECTIVES = [
    "Silent",
    "Crimson",
    "Hollow",
    "Golden",
    "Broken",
    "Distant",
    "Hidden",
    "Endless",
    "Paper",
    "Iron",
    "Velvet",
    "Frozen",
    "Burning",
    "Quiet",
    "Wandering",
    "Glass",
    "Midnight",
    "Forgotten",
    "Electric",
    "Lonely",
]
_NOUNS = [
    "Harbor",
    "Orchard",
    "Sparrow",
    "Lantern",
    "River",
    "Kingdom",
    "Garden",
    "Mirror",
    "Station",
    "Winter",
    "Compass",
    "Lighthouse",
    "Carnival",
    "Meadow",
    "Engine",
    "Letter",
    "Violin",
    "Island",
    "Bridge",
    "Summer",
]
_REVIEW_TEMPLATES = (
    'Write a one-sentence review of the film "{}".',
    'In one sentence, what did you think of the movie "{}"?',
    'Give a one-sentence opinion of the film "{}".',
)


def sentiment_prompts(seed: int) -> list[str]:
    """400 made-up film titles (adjective x noun), each with one of three request templates."""
    rng = random.Random(seed)
    titles = [f"The {a} {n}" for a in _ADJECTIVES for n in _NOUNS]
    rng.shuffle(titles)
    return [_REVIEW_TEMPLATES[i % len(_REVIEW_TEMPLATES)].format(t) for i, t in enumerate(titles)]


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_gold(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [−1, 1] (lexicon-based, offline)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


register_task(
    Task(
        name="sentiment",
        description="short film reviews; gold = VADER compound sentiment (positive is better)",
        prompts=sentiment_prompts,
        gold="tether.tools.tasks:vader_gold",
        max_new_tokens=32,
        tau=0.1,
    )
)


# --------------------------------------------------------------------------- arithmetic

_QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
_NUMBER = re.compile(r"-?\d+")
BRIEF_WORDS = 12


def arithmetic_prompts(seed: int) -> list[str]:
    """Every a + b and a − b (a ≥ b) for a, b in 1..15, shuffled: 345 distinct questions, so
    held-out prompts are never training prompts. Small numbers: SmolLM2-135M gets some right."""
    questions = [(a, "+", b) for a in range(1, 16) for b in range(1, 16)]
    questions += [(a, "-", b) for a in range(1, 16) for b in range(1, a + 1)]
    random.Random(seed).shuffle(questions)
    return [f"What is {a} {op} {b}? Reply with the number." for a, op, b in questions]


def arithmetic_gold(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for the right number in a brief answer (≤ 12 words), 0.5 right but rambling, else 0.

    The verifiable-reward case: the answer is computed from the question itself.
    """
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        match = _QUESTION.search(prompt)
        if match is None:
            raise TetherError(f"arithmetic gold: cannot read the question in {prompt!r}")
        a, op, b = int(match[1]), match[2], int(match[3])
        answer = str(a + b if op == "+" else a - b)
        correct = answer in _NUMBER.findall(response)
        brief = len(response.split()) <= BRIEF_WORDS
        out.append(1.0 if correct and brief else 0.5 if correct else 0.0)
    return out


register_task(
    Task(
        name="arithmetic",
        description="two-number addition and subtraction; gold = a verifier (right and brief)",
        prompts=arithmetic_prompts,
        gold="tether.tools.tasks:arithmetic_gold",
        max_new_tokens=24,
        tau=0.1,
        gold_range=(0.0, 1.0),
    )
)
