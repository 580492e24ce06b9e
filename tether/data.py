"""Readers, validation and tokenisation for SFT, preference, listwise and prompt data.

Every record is validated before any model is loaded: a bad line is reported as
`FILE:LINE: field 'X': problem`, so a user fixes the data instead of reading a stack trace
two hours into a run. Records that are valid but useless (identical chosen/rejected, nothing
left after truncation) are skipped and counted, never silently.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.core.losses import listwise_to_pairs
from tether.errors import TetherError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 10


def as_messages(prompt: str | list[Message]) -> list[Message]:
    """A prompt as chat messages: a plain string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class DataError(TetherError, ValueError):
    """Unusable input data; the message names file, line and field."""


@dataclass(frozen=True)
class SFTExample:
    """A conversation; loss is taken on every assistant turn."""

    messages: list[Message]


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class RankedResponses:
    """K responses to one prompt, `ranking` lists response indices best first."""

    prompt: list[Message]
    responses: list[str]
    ranking: list[int]


@dataclass
class LoadReport:
    """How many records were read and why any were skipped."""

    path: str
    read: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        kept = self.read - sum(self.skipped.values())
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.items())
        return f"{self.path}: {kept}/{self.read} records used" + (
            f" (skipped: {reasons})" if reasons else ""
        )


# --------------------------------------------------------------------------- reading files


def read_records(path: str | Path, format: str = "auto") -> list[tuple[int, Any]]:
    """(line or row number, record) for every record of a JSONL(.gz), Parquet or datasets dir."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if format == "auto":
        format = _detect_format(path)
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "arrow": _read_datasets_dir}
    if format not in readers:
        raise DataError(f"{path}: unknown data format '{format}' (use {sorted(readers)})")
    records = readers[format](path)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "arrow"
        raise DataError(f"{path}: a directory, but not a saved `datasets` dataset")
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")):
        return "jsonl"
    raise DataError(f"{path}: cannot tell the format from the name; set data.format")


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    records = []
    try:
        with opener(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{line_no}: not valid UTF-8 "
                        f"(byte {e.start}: {raw[e.start : e.start + 1]!r})"
                    ) from None
                if not text.strip():
                    continue
                try:
                    records.append((line_no, json.loads(text)))
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})"
                    ) from None
                except RecursionError:
                    raise DataError(f"{path}:{line_no}: JSON nested too deeply") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return records


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    return list(enumerate(rows, start=1))


def _read_datasets_dir(path: Path) -> list[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset needs `pip install datasets`") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a DatasetDict without a 'train' split: {list(loaded)}")
        loaded = loaded["train"]
    return list(enumerate(loaded.to_list(), start=1))


# --------------------------------------------------------------------------- validation


class _Errors:
    """Collects the first few problems so one run of the validator reports several."""

    def __init__(self, path: str) -> None:
        self.path, self.items, self.count = path, [], 0

    def add(self, line: int, field_name: str | None, problem: str) -> None:
        self.count += 1
        if len(self.items) < MAX_ERRORS_SHOWN:
            where = f"{self.path}:{line}: " + (f"field '{field_name}': " if field_name else "")
            self.items.append(where + problem)

    def raise_if_any(self) -> None:
        if self.items:
            more = (
                f"\n... and {self.count - len(self.items)} more"
                if self.count > len(self.items)
                else ""
            )
            raise DataError("\n".join(self.items) + more)


class _Bad(Exception):
    def __init__(self, field_name: str | None, problem: str) -> None:
        super().__init__(problem)
        self.field_name, self.problem = field_name, problem


def _text(record: dict, key: str) -> str:
    if key not in record:
        raise _Bad(key, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise _Bad(key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad(key, "empty text")
    return value


def _messages(value: Any, key: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise _Bad(key, "empty text")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _Bad(
            key, f"expected a string or a non-empty list of messages, got {type(value).__name__}"
        )
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _Bad(where, f"expected a {{role, content}} object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _Bad(f"{where}.role", f"must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _Bad(f"{where}.content", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise _Bad(f"{where}.content", "empty text")
        out.append({"role": role, "content": content})
    return out


def _parse_all(path: str | Path, format: str, parse) -> tuple[list, LoadReport]:
    records = read_records(path, format)
    report = LoadReport(str(path), read=len(records))
    errors = _Errors(str(path))
    out = []
    for line, record in records:
        if not isinstance(record, dict):
            errors.add(line, None, f"expected a JSON object, got {type(record).__name__}")
            continue
        try:
            parsed = parse(record)
        except _Bad as bad:
            errors.add(line, bad.field_name, bad.problem)
            continue
        if isinstance(parsed, str):  # a skip reason
            report.skipped[parsed] += 1
        else:
            out.append(parsed)
    errors.raise_if_any()
    if not out:
        raise DataError(f"{path}: no usable records ({report.summary()})")
    return out, report


def _parse_sft(record: dict) -> SFTExample:
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise _Bad("messages", "has no assistant message to learn from")
        return SFTExample(messages)
    if "prompt" in record or "completion" in record:
        if "prompt" not in record:
            raise _Bad("prompt", "missing")
        prompt = _messages(record["prompt"], "prompt")
        completion = _text(record, "completion")
        return SFTExample([*prompt, {"role": "assistant", "content": completion}])
    raise _Bad("messages", "missing (an SFT record has 'messages' or 'prompt' + 'completion')")


def load_sft_examples(
    path: str | Path, format: str = "auto"
) -> tuple[list[SFTExample], LoadReport]:
    return _parse_all(path, format, _parse_sft)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def split_hh_dialogue(text: str, key: str) -> tuple[list[Message], str]:
    """Anthropic HH format -> (messages before the last assistant turn, last assistant answer)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 5 or parts[-2] != "Assistant":
        raise _Bad(key, "not an HH dialogue ending in an '\\n\\nAssistant:' turn")
    messages = []
    for speaker, content in zip(parts[1:-2:2], parts[2:-2:2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages, parts[-1].strip()


def _parse_preference(record: dict) -> PreferencePair | RankedResponses | str:
    if "responses" in record:
        prompt = _messages(record.get("prompt"), "prompt")
        responses = record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise _Bad("responses", "expected a list of at least 2 strings")
        for i, r in enumerate(responses):
            if not isinstance(r, str) or not r.strip():
                raise _Bad(f"responses[{i}]", "expected a non-empty string")
        ranking = record.get("ranking")
        if (
            not isinstance(ranking, list)
            or sorted(ranking) != list(range(len(responses)))
            or any(isinstance(r, bool) for r in ranking)
        ):
            raise _Bad("ranking", f"must be a permutation of 0..{len(responses) - 1}, best first")
        return RankedResponses(prompt, list(responses), list(ranking))
    if "prompt" in record:
        prompt = _messages(record["prompt"], "prompt")
        chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    elif (
        "chosen" in record
        and isinstance(record["chosen"], str)
        and "\n\nAssistant:" in record["chosen"]
    ):
        prompt, chosen = split_hh_dialogue(record["chosen"], "chosen")
        rejected_prompt, rejected = split_hh_dialogue(_text(record, "rejected"), "rejected")
        if rejected_prompt != prompt:  # happens in real HH data: 2 of 1800 harmless-base
            return "chosen/rejected dialogues differ before the last answer"
        if not chosen or not rejected:
            return "empty final answer"
    else:
        raise _Bad(
            "prompt",
            "missing (a preference record has 'prompt', 'chosen', 'rejected', "
            "or HH dialogues in 'chosen'/'rejected')",
        )
    margin = record.get("margin")
    if margin is not None and (not isinstance(margin, int | float) or isinstance(margin, bool)):
        raise _Bad("margin", f"expected a number, got {type(margin).__name__}")
    if chosen == rejected:
        return "identical chosen/rejected"
    return PreferencePair(prompt, chosen, rejected, None if margin is None else float(margin))


def _answer(record: dict, key: str) -> str:
    """A response as a string, or a message list whose last message is the assistant's."""
    if key not in record:
        raise _Bad(key, "missing")
    value = record[key]
    if isinstance(value, list):
        messages = _messages(value, key)
        if messages[-1]["role"] != "assistant":
            raise _Bad(key, "a message list must end with the assistant's answer")
        return messages[-1]["content"]
    return _text(record, key)


def load_preference_data(
    path: str | Path, format: str = "auto"
) -> tuple[list[PreferencePair | RankedResponses], LoadReport]:
    return _parse_all(path, format, _parse_preference)


def _parse_prompt(record: dict) -> list[Message]:
    if "prompt" not in record:
        raise _Bad("prompt", "missing")
    return _messages(record["prompt"], "prompt")


def load_prompts(path: str | Path, format: str = "auto") -> tuple[list[list[Message]], LoadReport]:
    return _parse_all(path, format, _parse_prompt)


def _parse_prompt_record(record: dict) -> tuple[list[Message], dict[str, Any]]:
    return _parse_prompt(record), {k: v for k, v in record.items() if k != "prompt"}


def load_prompt_records(
    path: str | Path, format: str = "auto"
) -> tuple[list[list[Message]], list[dict[str, Any]], LoadReport]:
    """Prompts and each record's other fields (a verifier's `solution`, ...), which rewards
    called TRL's way receive as keyword columns."""
    parsed, report = _parse_all(path, format, _parse_prompt_record)
    return [m for m, _ in parsed], [c for _, c in parsed], report


def _parse_scored(record: dict) -> tuple[dict, list[Message], str]:
    if "prompt" not in record:
        raise _Bad("prompt", "missing")
    key = "response" if "response" in record or "completion" not in record else "completion"
    return record, _messages(record["prompt"], "prompt"), _text(record, key)


def load_scored_responses(
    path: str | Path, format: str = "auto"
) -> tuple[list[tuple[dict, list[Message], str]], LoadReport]:
    """(record, prompt messages, response) for `{prompt, response}` (or completion) records."""
    return _parse_all(path, format, _parse_scored)


# --------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class TokenizedSFT:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != -100)


def tokenize_sft(example: SFTExample, tokenizer, max_length: int) -> TokenizedSFT | None:
    """Token ids and labels with loss only on assistant turns (their content and end token).

    Each assistant turn's character span is found by rendering the conversation up to it with
    and without the turn; token offsets then say which tokens fall inside. Sequences longer
    than `max_length` are cut at the right; None when no assistant token survives.
    """
    messages = example.messages
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError(
                "the tokenizer's chat template does not render conversations "
                "prefix-consistently; cannot locate assistant turns"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = enc["input_ids"][:max_length]
    offsets = enc["offset_mapping"][:max_length]
    labels = [
        tok if any(s <= start < e for s, e in spans) and end > start else -100
        for tok, (start, end) in zip(input_ids, offsets, strict=True)
    ]
    if all(t == -100 for t in labels):
        return None
    return TokenizedSFT(input_ids, labels)


def collate_sft(batch: Sequence[TokenizedSFT], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(x.input_ids) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, x in enumerate(batch):
        n = len(x.input_ids)
        ids[row, :n] = torch.tensor(x.input_ids)
        labels[row, :n] = torch.tensor(x.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def expand_rankings(
    items: list[PreferencePair | RankedResponses], adjacent_only: bool
) -> list[PreferencePair]:
    """Listwise records become their ordered pairs, weighted to sum to 1 per prompt."""
    out: list[PreferencePair] = []
    for item in items:
        if isinstance(item, PreferencePair):
            out.append(item)
            continue
        pairs, weights = listwise_to_pairs(item.ranking, adjacent_only=adjacent_only)
        for (w, lo), weight in zip(pairs, weights, strict=True):
            out.append(
                PreferencePair(item.prompt, item.responses[w], item.responses[lo], None, weight)
            )
    return out


@dataclass
class PreferenceSplits:
    """Train and held-out records (pairs and rankings as read) with their load reports."""

    train: list[PreferencePair | RankedResponses]
    held_out: list[PreferencePair | RankedResponses]
    report: LoadReport
    eval_report: LoadReport

    def pairs(
        self, listwise_pairs: str = "all"
    ) -> tuple[list[PreferencePair], list[PreferencePair]]:
        """Both splits with rankings expanded into weighted pairs ("all" or "adjacent")."""
        adjacent = listwise_pairs == "adjacent"
        return expand_rankings(self.train, adjacent), expand_rankings(self.held_out, adjacent)


def load_preference_splits(data, seed: int) -> PreferenceSplits:
    """`data.train` (and `data.eval`, or a seeded `data.eval_fraction` of train).

    The split is by record, before rankings are expanded, so no prompt's ranking leaks into
    both sides.
    """
    items, report = load_preference_data(data.train, data.format)
    if data.eval:
        eval_items, eval_report = load_preference_data(data.eval, data.format)
    else:
        items, eval_items = split_train_eval(items, data.eval_fraction, seed)
        eval_report = report
    return PreferenceSplits(items, eval_items, report, eval_report)


def split_train_eval(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split; at least one eval item whenever eval_fraction > 0."""
    if eval_fraction <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(items) * eval_fraction))
    held = set(order[:n_eval])
    return (
        [x for i, x in enumerate(items) if i not in held],
        [x for i, x in enumerate(items) if i in held],
    )
