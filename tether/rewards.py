"""Rewards for policy optimisation: reward models, user functions and rule-based verifiers.

A reward gives one float per response, and several combine as a weighted sum. A reward model
is one more reward, so a verifier plugs in wherever a model would. A function is called in
one of two ways, read from its signature:

- tether's: `f(prompts, responses, **args)`, positionally;
- TRL's, when it has a parameter named `completions`: `f(prompts=..., completions=...,
  completion_ids=..., **columns)` by keyword, where `columns` are the prompt file's other
  fields (e.g. `solution`), one value per completion, and completions are message lists when
  the prompts are. It may return None for a response it has no opinion on (it then adds 0),
  and may be async.

A signature that cannot take what tether would pass is an error before any rollout. Outputs
are checked on every call: a function that raises, returns the wrong count or a non-finite
value is named together with the sample, as the reward is the one input an RL run cannot
sanity-check by itself.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.errors import RewardError, TetherError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


# --------------------------------------------------------------------------- built-ins


def length_reward(prompts: list[str], responses: list[str], unit: str = "words") -> list[float]:
    """Response length in words (or characters): a deliberately hackable reward for demos."""
    measure = len if unit == "chars" else (lambda text: len(text.split()))
    return [float(measure(r)) for r in responses]


def regex_reward(prompts: list[str], responses: list[str], pattern: str) -> list[float]:
    """1.0 where the response matches `pattern` (re.search), else 0.0."""
    compiled = re.compile(pattern)
    return [1.0 if compiled.search(r) else 0.0 for r in responses]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_answer_reward(
    prompts: list[str], responses: list[str], answers: dict[str, str]
) -> list[float]:
    """1.0 where the last number in the response equals the prompt's reference answer.

    `answers` maps prompt text to its answer; a prompt without one is an error, not a 0.
    """
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if p not in answers:
            raise RewardError(f"exact_answer: sample {i}: no reference answer for prompt {p!r}")
        numbers = _NUMBER.findall(r)
        out.append(1.0 if numbers and numbers[-1] == str(answers[p]).strip() else 0.0)
    return out


BUILTINS: dict[str, Callable[..., list[float]]] = {
    "length": length_reward,
    "regex": regex_reward,
    "exact_answer": exact_answer_reward,
}


def apply_missing_eos(
    scores: torch.Tensor, ended: torch.Tensor, mode: str, penalty: float
) -> torch.Tensor:
    """The score of a response cut at the token limit without EOS: [B], [B] bool -> [B].

    "subtract": s − penalty (TRL's missing_eos_penalty); "replace": −penalty (OpenAI's
    summarisation PPO); "none": s. Finished responses keep their score. Without a penalty a
    policy can learn to ramble to the limit, where an unfinished answer is never judged as such.
    """
    cut = ~ended.bool()
    if mode == "subtract":
        return torch.where(cut, scores - penalty, scores)
    if mode == "replace":
        return torch.where(cut, torch.full_like(scores, -penalty), scores)
    if mode == "none":
        return scores
    raise ValueError(f"unknown missing_eos mode {mode!r}; valid: subtract, replace, none")


# --------------------------------------------------------------------------- loading


def import_target(target: str, what: str, error: type[TetherError] = TetherError):
    """The module `package.module` or the file `path/to/file.py`, imported now: user code
    runs only when a run names it. `what` names it in errors ("reward module")."""
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise error(f"{what} file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"tether_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise error(f"cannot import {what} '{target}': {e}") from e


# Functions handed to the Python API that no import can find again (a notebook's, a lambda),
# by the `callable:NAME` spec each was given.
REGISTERED: dict[str, Callable[..., Any]] = {}


def spec_of(fn: Callable[..., Any]) -> str:
    """The spec a run's config records for a Python function: `module:function` where that
    import finds this very function again (a resumed run, or the CLI, can load it), else
    `callable:NAME`, which only this process knows."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname and "." not in qualname:
        try:
            if getattr(importlib.import_module(module), qualname, None) is fn:
                return f"{module}:{qualname}"
        except ImportError:
            pass
    name = getattr(fn, "__name__", type(fn).__name__).strip("<>")
    spec, n = f"callable:{name}", 1
    while REGISTERED.get(spec, fn) is not fn:
        n += 1
        spec = f"callable:{name}-{n}"
    REGISTERED[spec] = fn
    return spec


def load_function(spec: str) -> RewardFn:
    """`package.module:function` or `path/to/file.py:function`, imported only when named; or
    a function this process registered (`callable:NAME`)."""
    if spec.startswith("callable:"):
        if spec not in REGISTERED:
            raise RewardError(
                f"reward '{spec}' is a Python function given to tether's API in another "
                "process; pass the function again (reward=...) to resume the run"
            )
        return REGISTERED[spec]
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RewardError(
            f"reward function '{spec}' must look like module:function or file.py:function"
        )
    fn = getattr(import_target(target, "reward module", RewardError), name, None)
    if not callable(fn):
        raise RewardError(f"'{name}' in {target} is not a function")
    return fn


# What TRL passes a reward function besides the dataset's columns.
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")


def is_trl_style(fn: Callable[..., Any]) -> bool:
    """TRL's convention: the function names a `completions` parameter."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: tether's way
        return False


@dataclass
class RewardTerm:
    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    timeout_s: float = 0.0  # 0: no limit
    trl: bool = False  # called TRL's way (module docstring)

    def call(
        self,
        prompts: list,
        responses: list[str],
        columns: dict[str, list] | None = None,
        completion_ids: list[list[int]] | None = None,
    ) -> Any:
        if not self.trl:
            out = self.fn(prompts, responses)
        else:
            out = self.fn(**trl_arguments(self.fn, prompts, responses, columns, completion_ids))
        return asyncio.run(out) if inspect.isawaitable(out) else out

    def check(self, columns: set[str]) -> None:
        """Raise RewardError, before any rollout, where the signature cannot take what this
        term would pass it: TRL's arguments and `columns` (the prompt file's other fields)."""
        if not self.trl:
            return
        params = inspect.signature(self.fn).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        required = [p.name for p in params if p.default is p.empty and p.kind in kinds]
        missing = [n for n in required if n not in TRL_ARGUMENTS and n not in columns]
        if missing:
            raise RewardError(
                f"reward '{self.name}' is called TRL's way (it names `completions`): "
                f"f(prompts=, completions=, completion_ids=, **columns), but it needs "
                f"{', '.join(missing)}, which the prompt file's records lack (their other "
                f"fields: {', '.join(sorted(columns)) or 'none'})"
            )


def trl_arguments(
    fn: Callable[..., Any],
    prompts: list,
    responses: list[str],
    columns: dict[str, list] | None,
    completion_ids: list[list[int]] | None,
) -> dict[str, Any]:
    """TRL's keyword arguments, less those `fn` does not declare (unless it takes **kwargs).
    Completions are message lists where the prompts are."""
    completions: list = [
        [{"role": "assistant", "content": r}] if isinstance(p, list) else r
        for p, r in zip(prompts, responses, strict=True)
    ]
    offered = {"prompts": prompts, "completions": completions, **(columns or {})}
    if completion_ids is not None:
        offered["completion_ids"] = completion_ids
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return offered
    return {k: v for k, v in offered.items() if k in params}


@dataclass
class CombinedReward:
    """Σ_k w_k · f_k, each term checked; also returns the parts. A TRL-style term's None
    (no opinion on that response) adds 0."""

    terms: list[RewardTerm] = field(default_factory=list)

    def __call__(
        self,
        prompts: list,
        responses: list[str],
        columns: dict[str, list] | None = None,
        completion_ids: list[list[int]] | None = None,
    ) -> tuple[list[float], dict[str, list[float | None]]]:
        total = [0.0] * len(responses)
        parts: dict[str, list[float | None]] = {}
        for term in self.terms:
            values = checked_call(term, prompts, responses, columns, completion_ids)
            parts[term.name] = values
            total = [
                t + (term.weight * v if v is not None else 0.0)
                for t, v in zip(total, values, strict=True)
            ]
        return total, parts

    def check(self, columns: set[str]) -> None:
        for term in self.terms:
            term.check(columns)


def call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """fn() on a daemon thread, or TimeoutError after timeout_s (0: wait forever).

    A hung call cannot be killed from Python; its thread is abandoned and dies with the
    process, which is about to stop with an error anyway.
    """
    if not timeout_s:
        return fn()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="tether-reward")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no result within {timeout_s:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def checked_call(
    term: RewardTerm,
    prompts: list,
    responses: list[str],
    columns: dict[str, list] | None = None,
    completion_ids: list[list[int]] | None = None,
) -> list[float | None]:
    """The term's values, one per response, or a RewardError naming the term and sample.
    Only a TRL-style term may return None (no opinion)."""
    how = "TRL's way, by keyword" if term.trl else "tether's way, f(prompts, responses)"
    try:
        values = call_with_timeout(
            lambda: term.call(prompts, responses, columns, completion_ids), term.timeout_s
        )
    except RewardError:
        raise
    except TimeoutError as e:
        raise RewardError(
            f"reward '{term.name}' did not return within {term.timeout_s:g}s "
            f"(reward.timeout_s; batch of {len(responses)}, first response "
            f"{responses[0][:80]!r})"
        ) from e
    except Exception as e:
        raise RewardError(
            f"reward '{term.name}' raised {type(e).__name__}: {e} (called {how}; batch of "
            f"{len(responses)}, first response {responses[0][:80]!r})"
        ) from e
    values = list(values.tolist() if hasattr(values, "tolist") else values)
    if len(values) != len(responses):
        raise RewardError(
            f"reward '{term.name}' returned {len(values)} values for {len(responses)} responses"
        )
    for i, v in enumerate(values):
        if v is None and term.trl:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise RewardError(
                f"reward '{term.name}' gave {v!r} for sample {i}: prompt "
                f"{str(prompts[i])[:80]!r}, response {responses[i][:80]!r}"
            )
    return [None if v is None else float(v) for v in values]


def build_term(
    name: str, weight: float = 1.0, args: dict[str, Any] | None = None, timeout_s: float = 0.0
) -> RewardTerm:
    """A reward model (`model:DIR`), a built-in (`length`, `regex`, `exact_answer`) with its
    keyword args, or a function spec (`module:function`, `file.py:function`)."""
    args = dict(args or {})
    if name.startswith("model:"):  # a trained reward model dir, scored normalised
        from tether.models.reward_model import RewardModel

        rm = RewardModel.load(name.removeprefix("model:"), **args)
        return RewardTerm(name, lambda p, r: rm.score(p, r).tolist(), weight, timeout_s)
    if name in BUILTINS:
        builtin = BUILTINS[name]
        return RewardTerm(name, lambda p, r: builtin(p, r, **args), weight, timeout_s)
    fn = load_function(name)
    if is_trl_style(fn):
        call = functools.partial(fn, **args) if args else fn
        return RewardTerm(name, call, weight, timeout_s, trl=True)
    try:
        inspect.signature(fn).bind(["prompt"], ["response"], **args)
    except TypeError as e:
        raise RewardError(
            f"reward '{name}' is called tether's way, f(prompts, responses, **args), which its "
            f"signature {inspect.signature(fn)} cannot take ({e}); for TRL's way, by keyword, "
            "name its completions parameter `completions`"
        ) from e
    except ValueError:  # no signature to read: it is called as it is
        pass
    return RewardTerm(name, (lambda p, r: fn(p, r, **args)) if args else fn, weight, timeout_s)
