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
ROLES = ("system", "user", "assistant", "tool")
# Message keys kept besides role and content, for chat templates that render tool use.
TOOL_KEYS = ("tool_calls", "name", "tool_call_id")
MAX_ERRORS_SHOWN = 10


def as_messages(prompt: str | list[Message]) -> list[Message]:
    """A prompt as chat messages: a plain string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class DataError(TetherError, ValueError):
    """Unusable input data; the message names file, line and field."""


@dataclass(frozen=True)
class SFTExample:
    """A conversation, loss on every assistant turn; or plain `text` (TRL's language-modeling
    type), loss on every token."""

    messages: list[Message]
    text: str | None = None


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


@dataclass(frozen=True)
class ReadOptions:
    """How a data source is read: its format, the split and configuration of a `datasets`
    source, and `columns`, which maps tether's field names to the source's
    (`{"prompt": "question"}` reads each record's `question` as its prompt)."""

    format: str = "auto"
    split: str = "train"
    config: str = ""
    columns: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, data: Any, held_out: bool = False) -> ReadOptions:
        """The options of a config's `data` section, for `data.eval` where `held_out`."""
        split = data.eval_split if held_out else data.split
        return cls(data.format, split, data.config, dict(data.columns))


FORMATS = ("jsonl", "json", "csv", "parquet", "arrow", "hub")


def read_records(path: str | Path, options: ReadOptions = ReadOptions()) -> list[tuple[int, Any]]:
    """(line or row number, record) for every record of a source: JSONL(.gz), a JSON array,
    CSV, Parquet, a saved `datasets` dir, or anything `datasets.load_dataset` reads (a local
    dataset dir or script, a hub id where a hub or its offline cache is at hand)."""
    fmt = options.format
    local = Path(path)
    if fmt == "auto":
        fmt = _detect_format(local)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown data format '{fmt}' (use one of {list(FORMATS)})")
    if fmt != "hub" and not local.exists():
        raise DataError(f"{path}: no such file or directory")
    if fmt == "hub":
        records = _read_load_dataset(str(path), options)
    elif fmt == "arrow":
        records = _read_datasets_dir(local, options.split)
    else:
        records = {
            "jsonl": _read_jsonl,
            "json": _read_json,
            "csv": _read_csv,
            "parquet": _read_parquet,
        }[fmt](local)
    if not records:
        raise DataError(f"{path}: the source holds no records")
    return records


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "arrow"
        return "hub"  # a dir of data files (or a loading script) that load_dataset reads
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if not path.exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(path)):
        return "hub"  # `owner/name` that is no local path: a hub id
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    raise DataError(f"{path}: cannot tell the format from the name; set data.format")


def _open_text(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    records = []
    try:
        with _open_text(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                text = _decode(raw, path, line_no)
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


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{line_no}: not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None


def _read_json(path: Path) -> list[tuple[int, Any]]:
    """A `.json` file: one array of records (numbered from 1), or JSON Lines under a .json
    name, which is common."""
    try:
        with _open_text(path) as fh:
            raw = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not raw.lstrip().startswith(b"["):
        return _read_jsonl(path)
    text = _decode(raw, path, 1)
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return list(enumerate(loaded, start=1))


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    """CSV with a header row; a record's number is its line in the file."""
    import csv

    records = []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise DataError(f"{path}: no header row")
            line_no = reader.line_num + 1
            for row in reader:
                if None in row:
                    raise DataError(f"{path}:{line_no}: more values than header columns")
                records.append((line_no, dict(row)))
                line_no = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as CSV: {e}") from None
    return records


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    return list(enumerate(rows, start=1))


def _read_datasets_dir(path: Path, split: str) -> list[tuple[int, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split '{split}' (data.split); it has {list(loaded)}")
        loaded = loaded[split]
    return list(enumerate(loaded.to_list(), start=1))


def _read_load_dataset(source: str, options: ReadOptions) -> list[tuple[int, Any]]:
    """`datasets.load_dataset(source, config, split=split)`: a local dataset dir or a hub id
    (which needs a reachable hub or the dataset in the local `datasets` cache)."""
    import datasets

    try:
        loaded = datasets.load_dataset(source, options.config or None, split=options.split)
    except ValueError as e:  # a split or configuration the dataset lacks
        raise DataError(f"{source}: {e} (data.split / data.config)") from None
    except Exception as e:  # datasets raises many kinds for "cannot get it"
        where = "local dataset" if Path(source).exists() else "hub dataset"
        raise DataError(
            f"{source}: cannot load it as a {where} ({type(e).__name__}: {str(e)[:300]}); "
            "without a hub, give a file (JSONL, JSON, CSV, Parquet) or a saved dataset dir"
        ) from None
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
        tool_use = {k: m[k] for k in TOOL_KEYS if m.get(k) is not None}
        if content is None and tool_use.get("tool_calls"):
            content = ""  # an assistant turn that only calls tools
        elif not isinstance(content, str):
            raise _Bad(f"{where}.content", f"expected a string, got {type(content).__name__}")
        elif not content.strip():
            raise _Bad(f"{where}.content", "empty text")
        out.append({"role": role, "content": content, **tool_use})
    return out


def _parse_all(path: str | Path, options: ReadOptions, parse) -> tuple[list, LoadReport]:
    records = read_records(path, options)
    report = LoadReport(str(path), read=len(records))
    errors = _Errors(str(path))
    out = []
    for line, record in records:
        if not isinstance(record, dict):
            errors.add(line, None, f"expected a JSON object, got {type(record).__name__}")
            continue
        try:
            parsed = parse(_renamed(record, options.columns))
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


def _renamed(record: dict, columns: dict[str, str]) -> dict:
    """The record under tether's field names: `columns` maps each to the source's name."""
    if not columns:
        return record
    out = {k: v for k, v in record.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs not in record:
            raise _Bad(theirs, f"missing (data.columns reads {ours!r} from it)")
        out[ours] = record[theirs]
    return out


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
        if isinstance(record.get("completion"), list):  # conversational: assistant messages
            completion = _messages(record["completion"], "completion")
            if completion[0]["role"] != "assistant":
                raise _Bad("completion[0].role", "a completion starts with the assistant's turn")
            return SFTExample([*prompt, *completion])
        completion = _text(record, "completion")
        return SFTExample([*prompt, {"role": "assistant", "content": completion}])
    if "text" in record:
        return SFTExample([], _text(record, "text"))
    raise _Bad(
        "messages",
        "missing (an SFT record has 'messages', 'prompt' + 'completion', or 'text')",
    )


def load_sft_examples(
    path: str | Path, options: ReadOptions = ReadOptions()
) -> tuple[list[SFTExample], LoadReport]:
    return _parse_all(path, options, _parse_sft)


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
    if "label" in record and "completion" in record:
        raise _Bad(
            "label",
            "an unpaired preference (prompt, completion, label) is KTO's type; the reward model "
            "and DPO need pairs: 'chosen' and 'rejected' answers to one prompt",
        )
    if "prompt" in record:
        prompt = _messages(record["prompt"], "prompt")
        chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    elif isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list):
        prompt, chosen, rejected = _implicit_prompt_conversation(record)
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
    elif isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str):
        prompt, chosen, rejected = _implicit_prompt_text(record)
    else:
        raise _Bad(
            "prompt",
            "missing (a preference record has 'prompt', 'chosen', 'rejected', "
            "or 'chosen'/'rejected' that share the prompt, as TRL's implicit-prompt type)",
        )
    margin = record.get("margin")
    if margin is not None and (not isinstance(margin, int | float) or isinstance(margin, bool)):
        raise _Bad("margin", f"expected a number, got {type(margin).__name__}")
    if chosen == rejected:
        return "identical chosen/rejected"
    return PreferencePair(prompt, chosen, rejected, None if margin is None else float(margin))


def _implicit_prompt_conversation(record: dict) -> tuple[list[Message], str, str]:
    """TRL's conversational implicit prompt: chosen and rejected are whole conversations
    that differ only in the last (assistant) message; the shared messages are the prompt."""
    chosen, rejected = (
        _messages(record["chosen"], "chosen"),
        _messages(record["rejected"], "rejected"),
    )
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if shared == 0 or len(messages) != shared + 1 or messages[-1]["role"] != "assistant":
            raise _Bad(
                key,
                "with no 'prompt', chosen and rejected must share every message but a last, "
                "assistant one",
            )
    return chosen[:shared], chosen[-1]["content"], rejected[-1]["content"]


def _implicit_prompt_text(record: dict) -> tuple[list[Message], str, str]:
    """TRL's standard implicit prompt: the longest common prefix of chosen and rejected is
    the prompt (as TRL's `extract_prompt` takes it, a space before the split moving to the
    answers)."""
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    cut = 0
    while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
        cut += 1
    if cut and chosen[cut - 1] == " ":
        cut -= 1
    if not chosen[:cut].strip():
        raise _Bad("prompt", "missing, and chosen and rejected share no prompt text")
    return [{"role": "user", "content": chosen[:cut]}], chosen[cut:].strip(), rejected[cut:].strip()


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
    path: str | Path, options: ReadOptions = ReadOptions()
) -> tuple[list[PreferencePair | RankedResponses], LoadReport]:
    return _parse_all(path, options, _parse_preference)


def _parse_prompt(record: dict) -> list[Message]:
    if "prompt" not in record:
        raise _Bad("prompt", "missing")
    return _messages(record["prompt"], "prompt")


def load_prompts(
    path: str | Path, options: ReadOptions = ReadOptions()
) -> tuple[list[list[Message]], LoadReport]:
    return _parse_all(path, options, _parse_prompt)


def _parse_prompt_record(record: dict) -> tuple[list[Message], dict[str, Any]]:
    return _parse_prompt(record), {k: v for k, v in record.items() if k != "prompt"}


def load_prompt_records(
    path: str | Path, options: ReadOptions = ReadOptions()
) -> tuple[list[list[Message]], list[dict[str, Any]], LoadReport]:
    """Prompts and each record's other fields (a verifier's `solution`, ...), which rewards
    called TRL's way receive as keyword columns."""
    parsed, report = _parse_all(path, options, _parse_prompt_record)
    return [m for m, _ in parsed], [c for _, c in parsed], report


def _parse_scored(record: dict) -> tuple[dict, list[Message], str]:
    if "prompt" not in record:
        raise _Bad("prompt", "missing")
    key = "response" if "response" in record or "completion" not in record else "completion"
    return record, _messages(record["prompt"], "prompt"), _text(record, key)


def load_scored_responses(
    path: str | Path, options: ReadOptions = ReadOptions()
) -> tuple[list[tuple[dict, list[Message], str]], LoadReport]:
    """(record, prompt messages, response) for `{prompt, response}` (or completion) records."""
    return _parse_all(path, options, _parse_scored)


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
    if example.text is not None:
        return _tokenize_text(example.text, tokenizer, max_length)
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


def _tokenize_text(text: str, tokenizer, max_length: int) -> TokenizedSFT:
    """Plain text, loss on every token, ended by EOS as TRL's language-modeling type is (so
    the model learns where a text stops)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]
    ids = ids[:max_length]
    return TokenizedSFT(ids, list(ids))


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
    options = ReadOptions.of(data)
    items, report = load_preference_data(data.train, options)
    if data.eval:
        eval_items, eval_report = load_preference_data(data.eval, ReadOptions.of(data, True))
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
