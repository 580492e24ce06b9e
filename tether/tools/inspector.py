"""The KL inspector: where a response's KL penalty comes from, token by token.

For a prompt and one or more responses it shows, per response token, log π_θ, log π_ref, the
log-ratio log π_θ − log π_ref (the k1 KL term) and its share of the penalty β·KL. A response
the reference finds unlikely pays for every token the policy made more likely, so a long,
ornate answer can cost far more KL than a short one the reference already says: this makes
that visible. Optionally a reward model's score of each response.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import ModelConfig
from tether.core.advantages import gae, kl_penalized_rewards
from tether.data import Message, as_messages
from tether.hardware import resolve_device
from tether.models.loading import load_causal_lm, load_tokenizer
from tether.rollout.generation import encode_answer, encode_prompt
from tether.rollout.passes import build_batch, response_hidden, sequence_logprobs_of


@dataclass
class TokenRow:
    text: str
    logprob: float
    ref_logprob: float
    value: float | None = None  # the critic's V(state before this token)
    advantage: float | None = None  # GAE with r_t = −β·log-ratio (+ the score at the end)

    @property
    def log_ratio(self) -> float:
        return self.logprob - self.ref_logprob


@dataclass
class Inspection:
    response: str
    tokens: list[TokenRow]
    score: float | None = None

    @property
    def kl(self) -> float:
        """Σ_t (log π − log π_ref): the sequence's k1 KL, what β multiplies in PPO's reward."""
        return sum(t.log_ratio for t in self.tokens)


class Inspector:
    """Policy, reference (and optionally a reward model), loaded once for many prompts."""

    def __init__(
        self,
        policy: str,
        reference: str,
        temperature: float = 1.0,
        reward_model: str | None = None,
        critic: str | None = None,
        beta: float = 0.05,
        device: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(policy)
        self.models = {
            name: load_causal_lm(ModelConfig(name=source), self.tokenizer, dropout=False)
            .to(self.device)
            .eval()
            for name, source in (("policy", policy), ("reference", reference))
        }
        self.temperature, self.beta = temperature, beta
        self.critic = None
        if critic:
            backbone, head = load_critic(critic, self.tokenizer)
            self.critic = (
                (None if backbone is None else backbone.to(self.device)),
                head.to(self.device),
            )
        self.reward_model = None
        if reward_model:
            from tether.models.reward_model import RewardModel

            self.reward_model = RewardModel.load(reward_model, device=self.device)

    @torch.no_grad()
    def inspect(self, prompt: str | list[Message], responses: list[str]) -> list[Inspection]:
        """Each response tokenised exactly as DPO and PPO see it (through EOS) after the prompt."""
        messages = as_messages(prompt)
        answers = [encode_answer(self.tokenizer, messages, r) for r in responses]
        prompt_ids = encode_prompt(self.tokenizer, messages)
        batch = build_batch([prompt_ids] * len(answers), answers, self.tokenizer.pad_token_id)
        batch = batch.to(self.device)
        logprobs = {
            name: sequence_logprobs_of(model, batch, self.temperature)
            for name, model in self.models.items()
        }
        scores: list[float | None] = [None] * len(responses)
        if self.reward_model is not None:
            scores = self.reward_model.score([messages] * len(responses), responses).tolist()
        values = advantages = None
        if self.critic is not None:
            backbone, head = self.critic
            values = head(response_hidden(backbone or self.models["policy"], batch))
            values = values.squeeze(-1).float()
            log_ratio = logprobs["policy"] - logprobs["reference"]
            final_scores = torch.tensor([s or 0.0 for s in scores], device=self.device)
            rewards = kl_penalized_rewards(final_scores, log_ratio, batch.response_mask, self.beta)
            advantages, _ = gae(rewards, values, batch.response_mask, gamma=1.0, lam=0.95)
        return [
            Inspection(
                text,
                [
                    TokenRow(
                        self.tokenizer.decode([token]),
                        logprobs["policy"][row, t].item(),
                        logprobs["reference"][row, t].item(),
                        None if values is None else values[row, t].item(),
                        None if advantages is None else advantages[row, t].item(),
                    )
                    for t, token in enumerate(ids)
                ],
                scores[row],
            )
            for row, (text, ids) in enumerate(zip(responses, answers, strict=True))
        ]


def load_critic(path: str, tokenizer) -> tuple[torch.nn.Module | None, torch.nn.Module]:
    """(backbone or None, value head) from a PPO run's `final/`: its value head (run on the
    policy's hidden states) or its separate critic model."""
    from safetensors.torch import load_file

    from tether.models.loading import hf_model
    from tether.models.reward_model import load_reward_backbone
    from tether.stages.ppo import VALUE_HEAD_FILE

    root = Path(path)
    head_file = root / VALUE_HEAD_FILE if root.is_dir() else root
    if head_file.is_file():
        tensors = load_file(str(head_file))
        head = torch.nn.Linear(tensors["weight"].shape[1], 1, bias="bias" in tensors)
        head.load_state_dict(tensors)
        return None, head.eval()
    critic_dir = root / "critic" if (root / "critic").is_dir() else root
    backbone = load_reward_backbone(ModelConfig(name=str(critic_dir)), tokenizer, seed=0).eval()
    return backbone, hf_model(backbone).score


def _ansi(log_ratio: float) -> str:
    """Red where the policy is more likely than the reference (pays penalty), blue less."""
    if log_ratio > 1.0:
        return "\033[1;31m"
    if log_ratio > 0.1:
        return "\033[31m"
    if log_ratio < -0.1:
        return "\033[34m"
    return ""


def format_terminal(results: list[Inspection], beta: float, color: bool = True) -> str:
    lines = []
    for i, r in enumerate(results):
        head = f"response {i + 1}: {len(r.tokens)} tokens, KL = Σ log-ratio = {r.kl:.3f} nats"
        head += f", penalty β·KL = {beta * r.kl:.4f} (β = {beta:g})"
        if r.score is not None:
            head += f", reward-model score {r.score:.3f}"
        critic = r.tokens and r.tokens[0].value is not None
        columns = f"  {'token':<18}{'log π':>9}{'log π_ref':>11}{'log-ratio':>11}"
        lines += [head, columns + (f"{'value':>9}{'advantage':>11}" if critic else "")]
        for t in r.tokens:
            start, end = (_ansi(t.log_ratio), "\033[0m") if color else ("", "")
            token = repr(t.text)[1:-1][:16]
            extra = f"{t.value:>9.3f}{t.advantage:>11.3f}" if critic else ""
            lines.append(
                f"  {start}{token:<18}{t.logprob:>9.3f}{t.ref_logprob:>11.3f}"
                f"{t.log_ratio:>11.3f}{extra}{end}"
            )
        lines.append("")
    return "\n".join(lines)


def _shade(log_ratio: float) -> str:
    """Background colour: red where the policy prefers the token more than the reference
    does, blue where less, white at 0; full strength at |log-ratio| = 3 nats."""
    strength = min(abs(log_ratio) / 3.0, 1.0)
    fade = int(255 * (1 - strength))
    return f"rgb(255, {fade}, {fade})" if log_ratio >= 0 else f"rgb({fade}, {fade}, 255)"


def write_html(groups: list[tuple[str, list[Inspection]]], beta: float, path: Path) -> None:
    """One self-contained page: per prompt, each response with its tokens shaded by
    log-ratio, and a table."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>tether inspect</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "span.t{white-space:pre-wrap;padding:1px}td,th{padding:2px 8px;text-align:right}"
        "td:first-child{text-align:left;font-family:monospace}</style>",
        "<h1>Where the KL comes from</h1>",
        "<p>Red: the policy finds the token more likely than the reference does (log π − "
        "log π_ref &gt; 0, it adds to the KL penalty); blue: less likely.</p>",
    ]
    for prompt, results in groups:
        parts.append(f"<h2>Prompt: {html.escape(prompt)}</h2>")
        parts += [_html_response(i, r, beta) for i, r in enumerate(results)]
    path.write_text("\n".join(parts), encoding="utf-8")


def _html_response(index: int, r: Inspection, beta: float) -> str:
    score = f", reward-model score {r.score:.3f}" if r.score is not None else ""
    title = f"Response {index + 1}: KL {r.kl:.3f} nats, penalty β·KL {beta * r.kl:.4f}{score}"
    spans = "".join(
        f"<span class='t' style='background:{_shade(t.log_ratio)}' "
        f"title='log-ratio {t.log_ratio:.3f}'>{html.escape(t.text)}</span>"
        for t in r.tokens
    )
    critic = bool(r.tokens) and r.tokens[0].value is not None
    header = "<th>token</th><th>log π</th><th>log π_ref</th><th>log-ratio</th>"
    header += "<th>value</th><th>advantage</th>" if critic else ""
    rows = "".join(
        f"<tr><td>{html.escape(repr(t.text))}</td><td>{t.logprob:.3f}</td>"
        f"<td>{t.ref_logprob:.3f}</td><td>{t.log_ratio:.3f}</td>"
        + (f"<td>{t.value:.3f}</td><td>{t.advantage:.3f}</td>" if critic else "")
        + "</tr>"
        for t in r.tokens
    )
    return f"<h3>{html.escape(title)}</h3><p>{spans}</p><table><tr>{header}</tr>{rows}</table>"
