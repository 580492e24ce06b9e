import json

import pytest
from conftest import SHARED_HH, write_jsonl

from tether.data import (
    DataError,
    PreferencePair,
    RankedResponses,
    SFTExample,
    collate_sft,
    load_preference_data,
    load_prompts,
    load_sft_examples,
    split_train_eval,
    tokenize_sft,
)

GOOD_SFT = {"prompt": "Hi", "completion": "Hello!"}


# ------------------------------------------------------------------ bad input names file:line


def test_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_SFT, GOOD_SFT, '{"prompt": "x", '])
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        load_sft_examples(path)


def test_missing_field_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_SFT, {"prompt": "no answer"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'completion': missing"):
        load_sft_examples(path)


def test_wrong_type_names_line_and_field(tmp_path):
    rec = {"prompt": "q", "chosen": 42, "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [rec])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'chosen': expected a string, got int"):
        load_preference_data(path)


def test_empty_text_names_nested_field(tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_SFT, rec])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'messages\[1\]\.content': empty text"):
        load_sft_examples(path)


def test_bad_role_and_non_object(tmp_path):
    rec = {"messages": [{"role": "robot", "content": "q"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [rec, "[1, 2]"])
    with pytest.raises(DataError) as err:
        load_sft_examples(path)
    assert "d.jsonl:1: field 'messages[0].role'" in str(err.value)
    assert "d.jsonl:2: expected a JSON object, got list" in str(err.value)  # both reported


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps(GOOD_SFT).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n'
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        load_sft_examples(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_sft_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_sft_examples(tmp_path / "empty.jsonl")


def test_useless_records_are_skipped_and_counted(tmp_path):
    same = {"prompt": "q", "chosen": "a", "rejected": "a"}
    good = {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}
    pairs, report = load_preference_data(write_jsonl(tmp_path / "p.jsonl", [same, good, same]))
    assert pairs == [PreferencePair([{"role": "user", "content": "q"}], "a", "b", 2.0)]
    assert report.skipped["identical chosen/rejected"] == 2
    assert "1/3 records used" in report.summary()
    with pytest.raises(DataError, match="no usable records"):
        load_preference_data(write_jsonl(tmp_path / "q.jsonl", [same]))


# ------------------------------------------------------------------ formats


@pytest.mark.skipif(not SHARED_HH.is_file(), reason="../shared/data not present")
def test_hh_dialogues_split_into_prompt_and_answers():
    pairs, report = load_preference_data(SHARED_HH)
    assert report.read == 1800 and len(pairs) > 1700
    for pair in pairs[:200]:
        assert pair.prompt[0]["role"] == "user" and pair.prompt[-1]["role"] == "user"
        assert pair.chosen != pair.rejected
        assert "\n\nHuman:" not in pair.chosen and "\n\nAssistant:" not in pair.chosen


def test_hh_mismatched_dialogues_are_skipped_and_counted(tmp_path):
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: yo\n\nAssistant: b"}
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}
    pairs, report = load_preference_data(write_jsonl(tmp_path / "hh.jsonl", [bad, good]))
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b")]
    assert report.skipped == {"chosen/rejected dialogues differ before the last answer": 1}
    with pytest.raises(DataError, match=r"hh\.jsonl:1: field 'chosen': not an HH dialogue"):
        load_preference_data(
            write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nAssistant: x", "rejected": "y"}])
        )


def test_listwise_records_and_ranking_validation(tmp_path):
    rec = {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
    (item,), _ = load_preference_data(write_jsonl(tmp_path / "l.jsonl", [rec]))
    assert item == RankedResponses([{"role": "user", "content": "q"}], ["a", "b", "c"], [2, 0, 1])
    bad = dict(rec, ranking=[0, 0, 1])
    with pytest.raises(DataError, match="field 'ranking': must be a permutation"):
        load_preference_data(write_jsonl(tmp_path / "b.jsonl", [bad]))


def test_message_list_chosen_and_prompt_records(tmp_path):
    rec = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": "bad",
    }
    (pair,), _ = load_preference_data(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert pair.chosen == "good"
    prompts, _ = load_prompts(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "tell me"}]))
    assert prompts == [[{"role": "user", "content": "tell me"}]]


def test_gzip_parquet_and_datasets_dir_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [GOOD_SFT, {"prompt": "a", "completion": "b"}]
    expected, _ = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", records))
    assert load_sft_examples(write_jsonl(tmp_path / "d.jsonl.gz", records))[0] == expected
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert load_sft_examples(tmp_path / "d.parquet")[0] == expected
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    assert load_sft_examples(tmp_path / "ds")[0] == expected


def test_bad_parquet_row_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"prompt": "a", "completion": ""}]), tmp_path / "d.parquet"
    )
    with pytest.raises(DataError, match=r"d\.parquet:1: field 'completion': empty text"):
        load_sft_examples(tmp_path / "d.parquet")


# ------------------------------------------------------------------ tokenisation


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer_dir):
    from tether.models.loading import load_tokenizer

    return load_tokenizer(str(smol_tokenizer_dir))


def test_pad_token_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_loss_only_on_assistant_turns(tokenizer):
    ex = SFTExample(
        [
            {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "A pear."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "A plum."},
        ]
    )
    tok = tokenize_sft(ex, tokenizer, max_length=512)
    targets = tokenizer.decode([t for t in tok.labels if t != -100])
    assert targets == "A pear.<|im_end|>\nA plum.<|im_end|>\n"
    prompt_part = tokenizer.decode(
        [i for i, t in zip(tok.input_ids, tok.labels, strict=True) if t == -100]
    )
    assert "Name a fruit." in prompt_part and "pear" not in prompt_part


def test_truncation_keeps_the_left_and_drops_examples_without_targets(tokenizer):
    ex = SFTExample(
        [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    )
    assert tokenize_sft(ex, tokenizer, max_length=32) is None
    full = tokenize_sft(ex, tokenizer, max_length=4096)
    assert (
        len(tokenize_sft(ex, tokenizer, max_length=len(full.input_ids) - 1).input_ids)
        == len(full.input_ids) - 1
    )


def test_collate_pads_right_with_ignored_labels(tokenizer):
    a = tokenize_sft(
        SFTExample([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
        tokenizer,
        64,
    )
    b = tokenize_sft(
        SFTExample(
            [
                {"role": "user", "content": "a longer question here"},
                {"role": "assistant", "content": "and a longer answer"},
            ]
        ),
        tokenizer,
        64,
    )
    batch = collate_sft([a, b], tokenizer.pad_token_id)
    n = len(a.input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(b.input_ids) - n)
    assert (batch["labels"][0, n:] == -100).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, held = split_train_eval(items, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held)
    assert split_train_eval(items, 0.1, seed=3) == (train, held)
    assert split_train_eval(items, 0.1, seed=4)[1] != held
