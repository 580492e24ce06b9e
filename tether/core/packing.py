"""Batch layout: padding, positions, and packing rows that share a prefix.

These decide where each token sits in a forward pass (left or right padding, position ids
that skip padding, several prompts' rows packed into one padding-free row, length buckets),
so that every row computes what it would alone. Pure tensor bookkeeping: no model here.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


def pad_rows(
    rows: Sequence[list[int]], pad_id: int, side: str = "right", min_width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, W] ids and attention mask. Right padding for training batches; left padding
    (each row pushed to the right end) for prompts that generation continues."""
    width = max(min_width, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            span = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
    return ids, mask


def through_first_stop(row: list[int], stops: Sequence[int]) -> list[int]:
    """A sampled row up to and including its first stop token: decoders that keep a
    fixed-width batch (Hugging Face `generate`, the static decode loop) pad finished rows
    after it."""
    for position, token in enumerate(row):
        if token in stops:
            return row[: position + 1]
    return row


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the rightmost real token, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=1)


def batches_of_groups(groups: Sequence[list], rows_per_batch: int) -> list[list]:
    """Whole groups (a prompt's rows, run after one pass over the prompt) in batches of about
    `rows_per_batch` rows each: a group is never split, so a batch holds more only where one
    group alone does."""
    batches: list[list] = []
    for group in groups:
        if not batches or sum(map(len, batches[-1])) + len(group) > rows_per_batch:
            batches.append([])
        batches[-1].append(group)
    return batches


def distinct_rows(keys: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
    """(first [G], group_of [N]) for N keys with G distinct values: `first` holds the index
    of each distinct key's first occurrence (in order of appearance) and `group_of[i]` the
    position in `first` of key i's value, so keys[first[group_of[i]]] == keys[i]. For work
    done once per distinct row (a shared prompt) and then copied to its rows."""
    first_of: dict[Hashable, int] = {}
    for index, key in enumerate(keys):
        first_of.setdefault(key, index)
    group = {key: g for g, key in enumerate(first_of)}
    first = torch.tensor(list(first_of.values()), dtype=torch.long)
    return first, torch.tensor([group[key] for key in keys], dtype=torch.long)


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row begins with, leaving each row at least its last token (which the
    score is read at)."""
    shortest = min(len(r) for r in rows)
    length = 0
    while length < shortest - 1 and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length


@dataclass(frozen=True)
class PackedGroups:
    """Groups of token rows packed into one padding-free row (`pack_groups`)."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    # Per group: its [start, end) in the row and its [n, n] bool mask (may token i attend
    # token j). No token attends outside its group, so no [T, T] mask is ever built.
    segments: tuple[tuple[int, int, torch.Tensor], ...]
    last_index: torch.Tensor  # [Σ rows] where each row's last token sits, in row order
    # Per row, in row order: (its group's start, the group's prefix length, its suffix's start)
    row_layout: tuple[tuple[int, int, int], ...]

    def token_index(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Where tokens start..stop-1 of row `row` (counted in the row alone) sit."""
        group_start, prefix, suffix_start = self.row_layout[row]
        t = torch.arange(start, stop)
        return torch.where(t < prefix, group_start + t, suffix_start + t - prefix)


def pack_groups(groups: Sequence[Sequence[Sequence[int]]]) -> PackedGroups:
    """Every group in one row without padding: its common prefix once, then each row's own
    tokens (its suffix) in turn.

    Within a group, token i attends token j iff j ≤ i and j is in the prefix or in i's own
    suffix; a suffix's positions continue the prefix's (p, p + 1, ...). Each row's tokens so
    see exactly the context and positions they have alone, and a causal LM gives them the
    hidden states of an unpacked pass (up to float rounding), while the matmuls run over
    Σ (prefix + suffixes) real tokens instead of rows × the longest row. Rows of a group that
    share no token run as groups of their own, so the attention blocks stay small.
    """
    groups = [s for g in groups for s in ([g] if common_prefix_length(g) else [[r] for r in g])]
    ids: list[int] = []
    positions: list[int] = []
    segments: list[tuple[int, int, torch.Tensor]] = []
    last: list[int] = []
    layout: list[tuple[int, int, int]] = []
    for group in groups:
        prefix = common_prefix_length(group)
        start = len(ids)
        ids += group[0][:prefix]
        positions += range(prefix)
        part = [0] * prefix  # 0 for the prefix, k + 1 for row k's suffix
        for k, row in enumerate(group):
            layout.append((start, prefix, len(ids)))
            ids += row[prefix:]
            positions += range(prefix, len(row))
            part += [k + 1] * (len(row) - prefix)
            last.append(len(ids) - 1)
        parts = torch.tensor(part)
        causal = torch.ones(len(part), len(part), dtype=torch.bool).tril_()
        visible = (parts.unsqueeze(0) == 0) | (parts.unsqueeze(1) == parts.unsqueeze(0))
        segments.append((start, len(ids), causal & visible))
    return PackedGroups(
        input_ids=torch.tensor([ids]),
        position_ids=torch.tensor([positions]),
        segments=tuple(segments),
        last_index=torch.tensor(last),
        row_layout=tuple(layout),
    )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens; left padding would otherwise shift every position."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


# Another backbone call costs about as much as this many more tokens (measured on 2 CPU
# cores with SmolLM2-135M, forward and backward: ~0.1 s, mostly each call's own full-size
# weight gradients, against 1.3 ms a token at 16 rows): a bucket must save more padding.
BUCKET_OVERHEAD_TOKENS = 80


def length_buckets(
    answer_lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    most: int = 4,
    overhead: int = BUCKET_OVERHEAD_TOKENS,
) -> list[torch.Tensor]:
    """Row indices in at most `most` buckets, chosen to minimise the tokens a bucketed pass
    runs: per bucket, rows × (its longest prompt + its longest answer) + `overhead`.

    Responses in a rollout range from a few tokens to max_new_tokens, so a batch padded to
    its longest one is often a third padding. Rows are sorted by answer length and cut into
    contiguous runs by dynamic programming. A prompt already run (a shared prompt's cache)
    has length 0 here. One bucket, in the batch's own row order, where no cut pays.
    """
    rows = answer_lengths.shape[0]
    order = answer_lengths.argsort(stable=True)
    answers, prompts = answer_lengths[order].tolist(), prompt_lengths[order].tolist()
    cost = [[0] * (rows + 1) for _ in range(rows)]  # cost[i][j]: sorted rows i..j-1 as a bucket
    for i in range(rows):
        longest_prompt = 0
        for j in range(i, rows):
            longest_prompt = max(longest_prompt, prompts[j])
            # answers are sorted, so row j's is the bucket's longest
            cost[i][j + 1] = (j + 1 - i) * (longest_prompt + max(answers[j], 1))
    # best[j]: (tokens, cuts) of the cheapest split of the first j sorted rows into k buckets
    best = {j: (cost[0][j] + overhead, [j]) for j in range(1, rows + 1)}
    cheapest = best[rows]
    for k in range(2, min(most, rows) + 1):
        best = {
            j: min((best[i][0] + cost[i][j] + overhead, [*best[i][1], j]) for i in range(k - 1, j))
            for j in range(k, rows + 1)
        }
        cheapest = min(cheapest, best[rows])
    cuts = cheapest[1]
    if len(cuts) == 1:
        return [torch.arange(rows)]
    return [order[a:b] for a, b in itertools.pairwise([0, *cuts])]
