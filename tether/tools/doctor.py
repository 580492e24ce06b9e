"""The run doctor: read a run's metrics, samples and config and say what went wrong, with the
numbers that show it and the usual remedies.

Each rule is a small function of the run returning a `Finding` or None; thresholds are named
constants with the reason for their value. Rules compare an early window of the run with a
late one (the first and last fifth, at least 3 steps each) rather than single steps, so one
noisy batch neither raises nor hides a finding.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tether.runs.rundir import read_jsonl

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}

# A run shorter than this says too little about trends to judge them.
MIN_STEPS_FOR_TRENDS = 6
# Reward "rises" when the late mean beats the early mean by this many early stds (score_std
# is the spread of one batch, so 0.5 std is well above batch-to-batch noise of the mean).
RISE_IN_STDS = 0.5
# Flat reward: the gain is under this many stds over the whole run.
FLAT_IN_STDS = 0.1
# A sharp KL: per-sequence nats at which responses differ from the reference in most tokens
# (Gao et al. saw gold scores peak around 10-30 nats at 1B; 10 is where to start looking).
SHARP_KL_NATS = 10.0
# KL blow-up: fixed β and KL past this and still rising; adaptive β with KL at twice its
# target while β keeps climbing (the controller is not holding it).
KL_BLOWUP_NATS = 30.0
KL_BLOWUP_TARGET_FACTOR = 2.0
# k1 estimates average to the true (non-negative) KL when samples come from the policy; a
# batch mean below this, repeatedly, means they did not (sampling settings, stale log-probs).
NEGATIVE_KL_NATS = -0.5
# A condition holds "for many steps" when true on at least this share of the late window.
PERSISTENT_SHARE = 0.5
# PPO trust region: CleanRL's target_kl is 0.015 per token; 0.1 is far past it.
APPROX_KL_MAX = 0.1
# Healthy PPO clips 5-20% of tokens; above 0.3 most of each update is being cut away.
CLIPFRAC_MAX = 0.3
# A spike: a value more than this many median absolute deviations above the run's median.
SPIKE_MADS = 10.0
# The critic's first iterations: its values start at 0 (or at a fit to one rollout), so its
# loss there is its warm-up, not a sign of too large updates.
CRITIC_WARMUP_STEPS = 3
# Gradient-norm explosion: this many times the run's median norm.
GRAD_NORM_EXPLOSION = 10.0
# Entropy collapse: the late entropy under this share of the early one, or under the floor
# (nats per token; near-deterministic sampling).
ENTROPY_COLLAPSE_SHARE = 0.2
ENTROPY_FLOOR = 0.05
# Length drift: mean response length changed by more than this share of its early value.
LENGTH_DRIFT_SHARE = 0.5
# EOS collapse: most responses ended early on, few do late (they run into max_new_tokens).
EOS_EARLY_MIN, EOS_LATE_MAX = 0.5, 0.2
# Diversity: distinct bigrams fell under this share of their early value, or this share of
# a step's responses repeat another response to a different prompt.
DISTINCT_DROP_SHARE = 0.5
DUPLICATE_SHARE = 0.5
# GRPO/RLOO: groups whose k answers all scored alike carry no gradient.
FLAT_GROUPS_SHARE = 0.8
# Length collapse: the late mean length under this share of the early one while KL rises (the
# policy found that saying less pays); critical under the second share (a word or two).
LENGTH_COLLAPSE_SHARE = 0.5
LENGTH_COLLAPSE_CRITICAL_SHARE = 0.25
# Degenerate text: the share of an answer's word trigrams that repeat an earlier trigram of the
# same answer ("great great great", loops) past which the answers are mostly repetition.
REPEATED_TRIGRAM_SHARE = 0.3
# KL efficiency: KL bought per unit of score gain late in the run, against the early rate;
# past this factor (or KL rising by at least KL_SPEND_MIN_NATS with no gain) the run pays KL
# for nothing: the usual sign of over-optimisation before gold falls.
KL_PER_GAIN_FACTOR = 4.0
KL_SPEND_MIN_NATS = 1.0
# A critic explains little: explained variance under this on most late steps. 0 is a
# constant's; below 0.1 the advantages are the returns plus noise (REINFORCE without a
# baseline), which PPO's value function is there to avoid.
CRITIC_EXPLAINED_MIN = 0.1
# The late steps the critic rule reads, at least: one step's explained variance, from a
# rollout of 64 answers, swings by ±0.25 from the next (the demo's steps 13-16: 0.36, 0.02,
# −0.22, 0.25), so three steps are a coin toss.
CRITIC_LATE_STEPS = 6
# Over-regularised: KL stays under this many nats per sequence while β is at least this.
OVERREG_KL_NATS = 0.1
OVERREG_MIN_COEF = 0.2


@dataclass
class Finding:
    code: str
    severity: str  # "info", "warning" or "critical"
    steps: tuple[int, int]
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedies: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = list(self.steps)
        return out


@dataclass
class Run:
    """A run's logs, read once; `series(key)` gives the logged (step, value) pairs."""

    metrics: list[dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for record in self.metrics:
            value = record.get(key)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and math.isfinite(value):
                steps.append(int(record["step"]))
                values.append(float(value))
        return steps, values

    @property
    def last_step(self) -> int:
        return max((int(m["step"]) for m in self.metrics), default=0)


def windows(values: list[float], least: int = 3) -> tuple[list[float], list[float]]:
    """The early and late fifth: at least `least` values each, at most half the run (then at
    least 3), so that a short run's late window does not reach back into its start."""
    size = min(max(least, len(values) // 5), max(3, len(values) // 2))
    return values[:size], values[-size:]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score_gain(run: Run) -> tuple[float, float] | None:
    """(late − early mean score, early batch std), or None without enough steps."""
    _, score = run.series("reward/score_mean")
    if len(score) < MIN_STEPS_FOR_TRENDS:
        return None
    early, late = windows(score)
    _, stds = run.series("reward/score_std")
    spread = mean(windows(stds)[0]) if stds else statistics.pstdev(score)
    return mean(late) - mean(early), max(spread, 1e-8)


# --------------------------------------------------------------------------- sample signals


def distinct_bigrams(texts: list[str]) -> float:
    """Distinct word bigrams / all word bigrams over a step's responses (1 = no repeats)."""
    bigrams = [tuple(t.split()[i : i + 2]) for t in texts for i in range(len(t.split()) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def duplicate_share(samples: list[dict[str, Any]]) -> float:
    """Share of responses that repeat a response given to a different prompt."""
    by_response: dict[str, set[str]] = {}
    for s in samples:
        by_response.setdefault(s["response"].strip(), set()).add(str(s["prompt"]))
    repeated = sum(
        1 for s in samples if len(by_response[s["response"].strip()]) > 1 and s["response"]
    )
    return repeated / len(samples) if samples else 0.0


def empty_share(samples: list[dict[str, Any]]) -> float:
    """Share of responses with no text at all (the policy stops at once)."""
    return sum(not s["response"].strip() for s in samples) / len(samples) if samples else 0.0


def repeated_trigram_share(text: str) -> float:
    """Share of an answer's word trigrams that repeat an earlier one of the same answer."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def sample_steps(run: Run) -> list[tuple[int, list[dict[str, Any]]]]:
    by_step: dict[int, list[dict[str, Any]]] = {}
    for s in run.samples:
        by_step.setdefault(int(s["step"]), []).append(s)
    return sorted(by_step.items())


# --------------------------------------------------------------------------- rules


def nan_rule(run: Run) -> Finding | None:
    bad = [
        (int(m["step"]), k)
        for m in run.metrics
        for k, v in m.items()
        if (isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"))
        or (isinstance(v, float) and not math.isfinite(v))
    ]
    if not bad:
        return None
    keys = sorted({k for _, k in bad})
    return Finding(
        "nan",
        "critical",
        (bad[0][0], bad[-1][0]),
        f"non-finite values in {', '.join(keys[:4])}",
        {"first_step": bad[0][0], "keys": keys, "count": len(bad)},
        [
            "lower the learning rate",
            "check the reward for NaN/inf (tether names the sample when it returns one)",
            "use train.precision: fp32 to rule out bf16 overflow",
        ],
    )


def reward_hacking_rule(run: Run) -> Finding | None:
    gain = score_gain(run)
    if gain is None or gain[0] <= RISE_IN_STDS * gain[1]:
        return None
    rise, spread = gain
    steps, _ = run.series("reward/score_mean")
    evidence: dict[str, Any] = {"score_gain": round(rise, 4), "score_std_early": round(spread, 4)}
    gold_steps, gold = run.series("gold/mean")
    if len(gold) >= MIN_STEPS_FOR_TRENDS:
        early, late = windows(gold)
        peak_at = max(range(len(gold)), key=lambda i: gold[i])
        evidence |= {
            "gold_early": round(mean(early), 4),
            "gold_late": round(mean(late), 4),
            "gold_peak": round(gold[peak_at], 4),
            "gold_peak_step": gold_steps[peak_at],
        }
        if mean(late) < mean(early):
            return Finding(
                "reward_hacking",
                "critical",
                (gold_steps[peak_at], gold_steps[-1]),
                "the reward model's score rises while the gold judge's falls",
                evidence,
                HACKING_REMEDIES,
            )
        return None
    signals = []
    _, kl = run.series("kl/mean")
    if kl:
        kl_early, kl_late = mean(windows(kl)[0]), mean(windows(kl)[1])
        if kl_late > SHARP_KL_NATS and kl_late > kl_early:
            signals.append("kl")
            evidence |= {"kl_early": round(kl_early, 3), "kl_late": round(kl_late, 3)}
    _, length = run.series("response/length_mean")
    if len(length) >= MIN_STEPS_FOR_TRENDS:
        early_len, late_len = mean(windows(length)[0]), mean(windows(length)[1])
        if abs(late_len - early_len) > LENGTH_DRIFT_SHARE * max(early_len, 1.0):
            signals.append("length")
            evidence |= {"length_early": round(early_len, 2), "length_late": round(late_len, 2)}
    per_step = sample_steps(run)
    if len(per_step) >= 2:
        first, last = per_step[0][1], per_step[-1][1]
        d0 = distinct_bigrams([s["response"] for s in first])
        d1 = distinct_bigrams([s["response"] for s in last])
        if d1 < DISTINCT_DROP_SHARE * d0:
            signals.append("repetition")
            evidence |= {"distinct2_early": round(d0, 3), "distinct2_late": round(d1, 3)}
        dup = duplicate_share(last)
        if dup > DUPLICATE_SHARE:
            signals.append("same_answer")
            evidence["duplicate_share_late"] = round(dup, 3)
    if not signals:
        return None
    evidence["signals"] = signals
    return Finding(
        "reward_hacking",
        "warning",
        (steps[0], steps[-1]),
        "reward rises together with " + ", ".join(SIGNAL_WORDS[s] for s in signals),
        evidence,
        HACKING_REMEDIES,
    )


SIGNAL_WORDS = {
    "kl": "a sharp rise of KL",
    "length": "a drift in response length",
    "repetition": "falling diversity (distinct bigrams)",
    "same_answer": "near-identical answers across prompts",
}
HACKING_REMEDIES = [
    "raise the KL coefficient (ppo.kl.coef) or use adaptive KL with a lower target",
    "stop earlier: take the checkpoint before the gold score / diversity turned",
    "improve the reward model (more, or more varied, preference data; length-balanced pairs)",
    "read samples.jsonl at the late steps to see what the policy found",
]


def kl_rules(run: Run) -> list[Finding]:
    out = []
    steps, kl = run.series("kl/mean")
    if not kl:
        return out
    negative = [(s, v) for s, v in zip(steps, kl, strict=True) if v < NEGATIVE_KL_NATS]
    if len(negative) >= 3:
        out.append(
            Finding(
                "negative_kl",
                "warning",
                (negative[0][0], negative[-1][0]),
                f"the KL estimate is negative at {len(negative)} steps (down to "
                f"{min(v for _, v in negative):.2f} nats)",
                {"steps_negative": len(negative), "min_kl": min(v for _, v in negative)},
                [
                    "sample without top-k/top-p/min-length during training rollouts",
                    "compute log-probs with the sampling temperature",
                    "use the k3 estimator (never negative) for the penalty",
                ],
            )
        )
    if len(kl) < MIN_STEPS_FOR_TRENDS:
        return out
    early, late = windows(kl)
    _, coef = run.series("kl/coef")
    ppo_kl = run.config.get("ppo", {}).get("kl", {}) if run.config else {}
    rising = mean(late) > mean(early)
    if ppo_kl.get("adaptive"):
        target = float(ppo_kl.get("target", 6.0))
        climbing = len(coef) >= 2 and coef[-1] > coef[0]
        if rising and mean(late) > KL_BLOWUP_TARGET_FACTOR * target and climbing:
            out.append(
                Finding(
                    "kl_blowup",
                    "critical",
                    (steps[0], steps[-1]),
                    f"KL {mean(late):.1f} nats is over {KL_BLOWUP_TARGET_FACTOR:g}x its target "
                    f"{target:g} while the adaptive β keeps rising",
                    {
                        "kl_late": mean(late),
                        "target": target,
                        "coef_first": coef[0],
                        "coef_last": coef[-1],
                    },
                    [
                        "lower the learning rate or ppo.ppo_epochs",
                        "shorten ppo.kl.horizon so β reacts faster",
                        "start from a larger ppo.kl.coef",
                    ],
                )
            )
    elif rising and mean(late) > KL_BLOWUP_NATS:
        out.append(
            Finding(
                "kl_blowup",
                "critical",
                (steps[0], steps[-1]),
                f"KL grew to {mean(late):.1f} nats per response and is still rising",
                {"kl_early": mean(early), "kl_late": mean(late), "coef": coef[-1] if coef else 0},
                ["raise ppo.kl.coef or turn on ppo.kl.adaptive", "lower the learning rate"],
            )
        )
    return out


def persistent(run: Run, key: str, limit: float) -> tuple[list[int], float] | None:
    """Steps of the late window where `key` exceeds `limit`, if that is most of it."""
    steps, values = run.series(key)
    if len(values) < MIN_STEPS_FOR_TRENDS:
        return None
    size = len(windows(values)[1])
    over = [s for s, v in zip(steps[-size:], values[-size:], strict=True) if v > limit]
    if len(over) >= PERSISTENT_SHARE * size:
        return over, mean(values[-size:])
    return None


def spikes(
    run: Run, key: str, factor: float, by_ratio: bool = False, after: int = 0
) -> list[tuple[int, float]]:
    """Steps past `after` whose value is far above the run's median (by MADs, or by ratio)."""
    steps, values = run.series(key)
    if len(values) < MIN_STEPS_FOR_TRENDS:
        return []
    median = statistics.median(values)
    if by_ratio:
        limit = factor * max(median, 1e-8)
    else:
        mad = statistics.median(abs(v - median) for v in values)
        limit = median + factor * max(mad, 1e-8 + 0.01 * abs(median))
    return [(s, v) for s, v in zip(steps, values, strict=True) if v > limit and s > after]


def instability_rule(run: Run) -> Finding | None:
    evidence: dict[str, Any] = {}
    steps: list[int] = []
    for key, limit in (("policy/approx_kl", APPROX_KL_MAX), ("policy/clipfrac", CLIPFRAC_MAX)):
        hit = persistent(run, key, limit)
        if hit:
            evidence[f"{key}_late_mean"] = round(hit[1], 4)
            steps += hit[0]
    for key in ("policy/loss", "value/loss", "train/loss"):
        warm_up = CRITIC_WARMUP_STEPS if key == "value/loss" else 0
        found = spikes(run, key, SPIKE_MADS, after=warm_up)
        if found:
            evidence[f"{key}_spikes"] = [[s, round(v, 4)] for s, v in found[:5]]
            steps += [s for s, _ in found]
    found = spikes(run, "train/grad_norm", GRAD_NORM_EXPLOSION, by_ratio=True)
    if found:
        evidence["grad_norm_explosions"] = [[s, round(v, 3)] for s, v in found[:5]]
        steps += [s for s, _ in found]
    if not evidence:
        return None
    return Finding(
        "instability",
        "critical" if len(evidence) >= 2 else "warning",
        (min(steps), max(steps)),
        "updates are too large: " + ", ".join(sorted(k.split("_late")[0] for k in evidence)),
        evidence,
        [
            "lower the learning rate (optim.lr)",
            "fewer PPO epochs (ppo.ppo_epochs) or more minibatches",
            "keep gradient clipping on (optim.max_grad_norm)",
            "normalise or clip the reward (reward.normalize, reward.clip)",
        ],
    )


def collapse_rules(run: Run) -> list[Finding]:
    out = []
    steps, entropy = run.series("policy/entropy")
    if len(entropy) >= MIN_STEPS_FOR_TRENDS:
        early, late = mean(windows(entropy)[0]), mean(windows(entropy)[1])
        if late < ENTROPY_COLLAPSE_SHARE * early or late < ENTROPY_FLOOR:
            out.append(
                Finding(
                    "entropy_collapse",
                    "critical" if late < ENTROPY_FLOOR else "warning",
                    (steps[0], steps[-1]),
                    f"policy entropy fell from {early:.3f} to {late:.3f} nats per token",
                    {"entropy_early": early, "entropy_late": late},
                    [
                        "raise the KL coefficient: the reference keeps entropy up",
                        "add an entropy bonus (ppo.ent_coef)",
                        "lower the learning rate",
                    ],
                )
            )
    steps, eos = run.series("response/eos_frac")
    if len(eos) >= MIN_STEPS_FOR_TRENDS:
        early, late = mean(windows(eos)[0]), mean(windows(eos)[1])
        if early >= EOS_EARLY_MIN and late <= EOS_LATE_MAX:
            out.append(
                Finding(
                    "length_collapse",
                    "warning",
                    (steps[0], steps[-1]),
                    f"responses stopped ending: EOS rate {early:.2f} -> {late:.2f}; they run "
                    "into max_new_tokens",
                    {"eos_frac_early": early, "eos_frac_late": late},
                    [
                        "penalise unfinished responses (rollout.missing_eos, missing_eos_penalty)",
                        "check whether the reward pays for length",
                    ],
                )
            )
    return out


def shrinking_rule(run: Run) -> Finding | None:
    """Answers collapsing in length while the policy moves away from the reference: the
    reward (or the KL) pays for saying less, down to a word or two that are not answers."""
    steps, length = run.series("response/length_mean")
    _, kl = run.series("kl/mean")
    if len(length) < MIN_STEPS_FOR_TRENDS or len(kl) < MIN_STEPS_FOR_TRENDS:
        return None
    early, late = mean(windows(length)[0]), mean(windows(length)[1])
    # Against the first step's KL (the policy starts at the reference): a collapse within
    # the first few steps is already in the early window.
    kl_early, kl_late = kl[0], mean(windows(kl)[1])
    if not (late < LENGTH_COLLAPSE_SHARE * early and kl_late > kl_early):
        return None
    return Finding(
        "length_collapse",
        "critical" if late < LENGTH_COLLAPSE_CRITICAL_SHARE * early else "warning",
        (steps[0], steps[-1]),
        f"answers shrank from {early:.1f} to {late:.1f} tokens while KL rose from "
        f"{kl_early:.2f} to {kl_late:.2f} nats",
        {
            "length_early": round(early, 2),
            "length_late": round(late, 2),
            "kl_early": round(kl_early, 3),
            "kl_late": round(kl_late, 3),
        },
        [
            "read samples.jsonl at the late steps: short answers that score well are what the "
            "reward model pays for",
            "check the reward for a bias towards short answers (rm-eval's length_corr)",
            "raise ppo.kl.coef, or stop at a KL budget (ppo.kl.budget)",
            "take the checkpoint from before the length fell",
        ],
    )


def degenerate_text_rule(run: Run) -> Finding | None:
    """What a reviewer sees in samples.jsonl: less varied wording, answers that repeat
    themselves, and the same few answers given to different prompts."""
    per_step = sample_steps(run)
    if len(per_step) < 2:
        return None
    (first_step, first), (last_step, last) = per_step[0], per_step[-1]
    signals, evidence = [], {}
    d0 = distinct_bigrams([s["response"] for s in first])
    d1 = distinct_bigrams([s["response"] for s in last])
    if d1 < DISTINCT_DROP_SHARE * d0:
        signals.append("fewer distinct bigrams")
        evidence |= {"distinct2_early": round(d0, 3), "distinct2_late": round(d1, 3)}
    r0 = mean([repeated_trigram_share(s["response"]) for s in first])
    r1 = mean([repeated_trigram_share(s["response"]) for s in last])
    if r1 > REPEATED_TRIGRAM_SHARE and r1 > 2 * r0:
        signals.append("answers repeating themselves")
        evidence |= {
            "repeated_trigrams_early": round(r0, 3),
            "repeated_trigrams_late": round(r1, 3),
        }
    e0, e1 = empty_share(first), empty_share(last)
    if e1 > DUPLICATE_SHARE and e1 > e0:
        signals.append("empty answers")
        evidence |= {"empty_share_early": round(e0, 3), "empty_share_late": round(e1, 3)}
    dup0, dup1 = duplicate_share(first), duplicate_share(last)
    if dup1 > DUPLICATE_SHARE and dup1 > dup0:
        signals.append("the same answers to different prompts")
        evidence |= {
            "duplicate_share_early": round(dup0, 3),
            "duplicate_share_late": round(dup1, 3),
        }
    if not signals:
        return None
    examples = sorted({s["response"].strip() for s in last}, key=len)[:3]
    evidence["late_examples"] = examples
    return Finding(
        "degenerate_text",
        "warning",
        (first_step, last_step),
        "the answers degenerate: " + ", ".join(signals),
        evidence,
        [
            "read samples.jsonl: the late answers show what the reward pays for",
            "raise ppo.kl.coef, or stop at a KL budget (ppo.kl.budget)",
            "take the checkpoint from before the answers degenerated",
            "improve the reward model on such answers (add them as rejected)",
        ],
    )


def kl_efficiency_rule(run: Run) -> Finding | None:
    """KL spent per unit of score gain, late in the run against early: a policy that keeps
    moving away from the reference without the reward following is over-optimising."""
    _, score = run.series("reward/score_mean")
    steps, kl = run.series("kl/mean")
    if len(score) < 2 * MIN_STEPS_FOR_TRENDS or len(kl) != len(score):
        return None
    size = max(3, len(score) // 5)
    middle = len(score) // 2

    def at(values: list[float], start: int) -> float:
        return mean(values[start : start + size])

    r_a, r_b, r_c = at(score, 0), at(score, middle - size // 2), at(score, len(score) - size)
    k_a, k_b, k_c = at(kl, 0), at(kl, middle - size // 2), at(kl, len(kl) - size)
    gain_early, gain_late, spent_late = r_b - r_a, r_c - r_b, k_c - k_b
    gain = score_gain(run)
    noise = gain[1] * FLAT_IN_STDS if gain else 0.0
    if gain_early <= noise or spent_late < KL_SPEND_MIN_NATS:
        return None
    early_rate = max(k_b - k_a, 1e-6) / gain_early
    late_rate = spent_late / gain_late if gain_late > noise else math.inf
    if late_rate < KL_PER_GAIN_FACTOR * early_rate:
        return None
    return Finding(
        "kl_inefficient",
        "warning",
        (steps[middle], steps[-1]),
        f"late in the run KL rises {spent_late:.2f} nats for a score gain of {gain_late:.3f}: "
        f"{'no gain' if math.isinf(late_rate) else f'{late_rate:.3g} nats per unit'} against "
        f"{early_rate:.3g} early on",
        {
            "kl_per_gain_early": round(early_rate, 4),
            "kl_per_gain_late": None if math.isinf(late_rate) else round(late_rate, 4),
            "score_gain_late": round(gain_late, 4),
            "kl_spent_late": round(spent_late, 3),
        },
        [
            "stop earlier: the checkpoint from the middle of the run has most of the gain",
            "stop at a KL budget (ppo.kl.budget)",
            "raise ppo.kl.coef or lower the learning rate",
        ],
    )


def critic_rule(run: Run) -> Finding | None:
    """A value function that explains (almost) none of the returns: PPO's advantages are then
    the returns plus noise, and the run learns like REINFORCE without a baseline."""
    steps, explained = run.series("value/explained_var")
    if len(explained) < MIN_STEPS_FOR_TRENDS:
        return None
    late = windows(explained, least=CRITIC_LATE_STEPS)[1]
    if sum(v < CRITIC_EXPLAINED_MIN for v in late) < PERSISTENT_SHARE * len(late):
        return None
    return Finding(
        "critic_not_learning",
        "warning",
        (steps[0], steps[-1]),
        f"the critic explains little of the returns: explained variance {mean(late):.2f} "
        "late in the run (1 is a perfect critic, 0 a constant)",
        {
            "explained_var_early": round(mean(windows(explained)[0]), 3),
            "explained_var_late": round(mean(late), 3),
        },
        [
            "initialise the value head from the reward model (critic.init: RM_DIR)",
            "give the critic its own learning rate (critic.lr) or a larger ppo.vf_coef",
            "normalise the reward (reward.normalize) so the value targets have unit scale",
            "more PPO epochs, so the value head fits each batch",
        ],
    )


def stagnation_rule(run: Run) -> Finding | None:
    reasons, evidence = [], {}
    gain = score_gain(run)
    if gain is not None and abs(gain[0]) < FLAT_IN_STDS * gain[1]:
        reasons.append("the reward is flat")
        evidence |= {"score_gain": round(gain[0], 4), "score_std_early": round(gain[1], 4)}
    flat = persistent(run, "reward/flat_group_frac", FLAT_GROUPS_SHARE)
    if flat:
        reasons.append("most groups scored all their answers alike (zero advantage)")
        evidence["flat_group_frac_late"] = round(flat[1], 3)
    if not reasons:
        return None
    remedies = ["raise the learning rate", "check that the reward varies across responses"]
    if flat:
        remedies.append("more samples per prompt, or prompts of a difficulty where answers differ")
    return Finding(
        "stagnation",
        "warning",
        (run.metrics[0]["step"], run.last_step),
        "the run is not learning: " + "; ".join(reasons),
        evidence,
        remedies,
    )


def over_regularized_rule(run: Run) -> Finding | None:
    gain = score_gain(run)
    _, kl = run.series("kl/mean")
    _, coef = run.series("kl/coef")
    if gain is None or not kl or not coef:
        return None
    kl_late = mean(windows(kl)[1])
    if (
        abs(kl_late) < OVERREG_KL_NATS
        and coef[-1] >= OVERREG_MIN_COEF
        and gain[0] < RISE_IN_STDS * gain[1]
    ):
        return Finding(
            "over_regularized",
            "warning",
            (run.metrics[0]["step"], run.last_step),
            f"β = {coef[-1]:g} holds the policy at the reference (KL {kl_late:.3f} nats) and "
            "the reward does not move",
            {"kl_coef": coef[-1], "kl_late": kl_late, "score_gain": gain[0]},
            ["lower ppo.kl.coef (typical: 0.02-0.1)", "or use adaptive KL with a target"],
        )
    return None


RULES: list[Callable[[Run], Finding | list[Finding] | None]] = [
    nan_rule,
    reward_hacking_rule,
    kl_rules,
    instability_rule,
    collapse_rules,
    shrinking_rule,
    degenerate_text_rule,
    kl_efficiency_rule,
    critic_rule,
    stagnation_rule,
    over_regularized_rule,
]


def diagnose(run: Run) -> list[Finding]:
    """Every finding, most severe first."""
    findings: list[Finding] = []
    for rule in RULES:
        result = rule(run)
        if isinstance(result, list):
            findings += result
        elif result is not None:
            findings.append(result)
    # Over-regularisation explains a flat reward better than "not learning" does.
    if any(f.code == "over_regularized" for f in findings):
        findings = [f for f in findings if f.code != "stagnation"]
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.steps[0]))


def read_run(run_dir: str | Path) -> Run:
    """metrics.jsonl (required), samples.jsonl and config.yaml (if present); torn lines are
    skipped, as a crashed run leaves them."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        from tether.errors import TetherError

        raise TetherError(f"{run_dir} has no metrics.jsonl: not a tether run dir")

    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return Run(read_jsonl(metrics_path), read_jsonl(run_dir / "samples.jsonl"), config or {})


def exit_status(findings: list[Finding]) -> int:
    """0 healthy (info at most), 1 warnings, 2 critical."""
    severities = {f.severity for f in findings}
    return 2 if "critical" in severities else 1 if "warning" in severities else 0


def format_findings(findings: list[Finding], run_dir: str) -> str:
    if not findings:
        return f"{run_dir}: healthy: no finding"
    lines = [f"{run_dir}: {len(findings)} finding(s)"]
    for f in findings:
        lines.append(f"\n[{f.severity.upper()}] {f.code} (steps {f.steps[0]}-{f.steps[1]})")
        lines.append(f"  {f.summary}")
        for key, value in f.evidence.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            lines.append(f"    {key}: {shown}")
        for remedy in f.remedies:
            lines.append(f"  - {remedy}")
    return "\n".join(lines)
