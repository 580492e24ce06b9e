"""Hostile data: every loader, fed random bytes, random JSON records, deep nesting, huge
strings, invalid UTF-8 and mixed-up formats, gives a clean error (a TetherError naming the
file) or loads with counted skips; never an unhandled exception."""

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.data import load_preference_data, load_prompts, load_scored_responses, load_sft_examples
from tether.errors import TetherError

LOADERS = {
    "sft": load_sft_examples,
    "preference": load_preference_data,
    "prompts": load_prompts,
    "scored": load_scored_responses,
}
SUFFIXES = [".jsonl", ".json", ".jsonl.gz", ".parquet", ".ndjson"]
FIELDS = [
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "response",
    "messages",
    "responses",
    "ranking",
    "margin",
    "role",
    "content",
]
EXAMPLES = 300  # per loader and strategy: 4 loaders x 3 strategies x 300 = 3,600 inputs

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "robot", ""]), "content": scalars}
    ),
    max_size=4,
)
records = st.dictionaries(st.sampled_from(FIELDS), json_values | messages, max_size=5)


def load(loader, suffix: str, payload: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)
        try:
            loader(path)
        except TetherError as e:
            assert str(path) in str(e)  # the error names the file


@pytest.mark.parametrize("name", list(LOADERS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=600), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_give_a_clean_error(name, payload, suffix):
    load(LOADERS[name], suffix, payload)


@pytest.mark.parametrize("name", list(LOADERS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(records | json_values, min_size=1, max_size=6))
def test_random_json_records_load_or_fail_cleanly(name, lines):
    payload = "".join(json.dumps(x) + "\n" for x in lines).encode()
    load(LOADERS[name], ".jsonl", payload)


@pytest.mark.parametrize("name", list(LOADERS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(min_value=1, max_value=200_000),
    garbage=st.binary(min_size=1, max_size=8),
    where=st.sampled_from(["nesting", "utf8", "both"]),
)
def test_deep_nesting_and_invalid_utf8_give_a_clean_error(name, depth, garbage, where):
    good = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b", "completion": "c"})
    nested = ('{"prompt": ' + "[" * depth + "]" * depth + "}").encode()
    broken = b'{"prompt": "' + b"\xff" + garbage + b'"}'
    lines = [good.encode()]
    lines += [nested] if where != "utf8" else []
    lines += [broken] if where != "nesting" else []
    load(LOADERS[name], ".jsonl", b"\n".join(lines) + b"\n")


def test_huge_strings_load():
    huge = "word " * 400_000  # 2 MB in one field
    record = {"prompt": huge, "chosen": huge, "rejected": huge + "!", "completion": huge}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "huge.jsonl"
        path.write_text(json.dumps(record) + "\n")
        for loader in LOADERS.values():
            loaded, _ = loader(path)
            assert len(loaded) == 1
