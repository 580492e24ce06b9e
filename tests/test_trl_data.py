"""TRL's dataset types and file formats, one fixture each: each loads into tether's records
(or gets an error that says what tether needs), and `data.columns` renames a source's fields."""

import json

import pytest
from conftest import write_jsonl

from tether.config import SFTConfig, load_config
from tether.data import (
    DataError,
    PreferencePair,
    ReadOptions,
    SFTExample,
    load_preference_data,
    load_prompt_records,
    load_prompts,
    load_sft_examples,
    tokenize_sft,
)

USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}


# ------------------------------------------------------------------ the dataset types


def test_language_modeling_text(tmp_path):
    (example,), _ = load_sft_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "The sky."}]))
    assert example == SFTExample([], "The sky.")


def test_text_is_learnt_on_every_token_and_ends_with_eos(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tokenized = tokenize_sft(SFTExample([], "The sky is blue."), tok, max_length=64)
    assert tokenized.labels == tokenized.input_ids
    assert tokenized.input_ids[-1] == tok.eos_token_id
    assert tok.decode(tokenized.input_ids[:-1]) == "The sky is blue."


def test_prompt_completion_standard_and_conversational(tmp_path):
    records = [
        {"prompt": "What color is the sky?", "completion": "It is blue."},
        {"prompt": [USER], "completion": [BLUE]},
    ]
    standard, conversational = load_sft_examples(write_jsonl(tmp_path / "pc.jsonl", records))[0]
    assert standard == conversational == SFTExample([USER, BLUE])


def test_conversational_completion_must_start_with_the_assistant(tmp_path):
    rec = {"prompt": [USER], "completion": [USER]}
    with pytest.raises(DataError, match=r"pc\.jsonl:1: field 'completion\[0\]\.role'"):
        load_sft_examples(write_jsonl(tmp_path / "pc.jsonl", [rec]))


def test_tool_role_and_tool_calls_are_kept(tmp_path):
    call = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    messages = [
        USER,
        {"role": "assistant", "tool_calls": call},
        {"role": "tool", "name": "weather", "content": "blue"},
        BLUE,
    ]
    (example,), _ = load_sft_examples(
        write_jsonl(tmp_path / "tool.jsonl", [{"messages": messages}])
    )
    assert example.messages[1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert example.messages[2] == {"role": "tool", "content": "blue", "name": "weather"}


def test_prompt_only_standard_and_conversational(tmp_path):
    prompts, _ = load_prompts(
        write_jsonl(
            tmp_path / "p.jsonl", [{"prompt": "What color is the sky?"}, {"prompt": [USER]}]
        )
    )
    assert prompts == [[USER], [USER]]


def test_preference_explicit_prompt_conversational(tmp_path):
    rec = {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}
    (pair,), _ = load_preference_data(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert pair == PreferencePair([USER], "It is blue.", "It is green.")


def test_preference_implicit_prompt_conversational(tmp_path):
    rec = {"chosen": [USER, BLUE], "rejected": [USER, GREEN]}
    (pair,), _ = load_preference_data(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert pair == PreferencePair([USER], "It is blue.", "It is green.")


def test_preference_implicit_prompt_standard_splits_as_trl(tmp_path):
    rec = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    (pair,), _ = load_preference_data(write_jsonl(tmp_path / "p.jsonl", [rec]))
    # TRL's extract_prompt: the common prefix, less the space before the answers.
    assert pair == PreferencePair([{"role": "user", "content": "The sky is"}], "blue.", "green.")


def test_implicit_prompt_conversations_that_differ_early_are_refused(tmp_path):
    other = {"role": "user", "content": "And the grass?"}
    rec = {"chosen": [USER, BLUE], "rejected": [other, GREEN]}
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'chosen': with no 'prompt'"):
        load_preference_data(write_jsonl(tmp_path / "p.jsonl", [rec]))


def test_unpaired_preference_gets_an_error_naming_kto(tmp_path):
    rec = {"prompt": "q", "completion": "a", "label": True}
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'label': .*KTO"):
        load_preference_data(write_jsonl(tmp_path / "p.jsonl", [rec]))


# ------------------------------------------------------------------ file formats and columns


def test_json_array_csv_and_jsonl_read_alike(tmp_path):
    records = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    expected, _ = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", records))
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
    assert load_sft_examples(tmp_path / "d.json")[0] == expected
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    assert load_sft_examples(tmp_path / "lines.json")[0] == expected
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    assert load_sft_examples(tmp_path / "d.csv")[0] == expected


def test_csv_errors_name_the_file_line(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\na,b\n"multi\nline",\n')
    with pytest.raises(DataError, match=r"d\.csv:3: field 'completion': empty text"):
        load_sft_examples(tmp_path / "d.csv")


def test_json_array_error_names_the_element(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a", "completion": "b"}, 7]))
    with pytest.raises(DataError, match=r"d\.json:2: expected a JSON object, got int"):
        load_sft_examples(tmp_path / "d.json")


def test_column_mapping_reads_the_source_names(tmp_path):
    rec = {"question": "What is 6 + 2?", "solution": "8"}
    path = write_jsonl(tmp_path / "q.jsonl", [rec])
    prompts, columns, _ = load_prompt_records(path, ReadOptions(columns={"prompt": "question"}))
    assert prompts == [[{"role": "user", "content": "What is 6 + 2?"}]]
    assert columns == [{"solution": "8"}]
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'query': missing \(data.columns"):
        load_prompts(path, ReadOptions(columns={"prompt": "query"}))


def test_datasets_dir_split_and_load_dataset_dir(tmp_path):
    import datasets

    train = [{"prompt": "a", "completion": "b"}]
    test = [{"prompt": "c", "completion": "d"}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(tmp_path / "saved"))
    assert load_sft_examples(tmp_path / "saved", ReadOptions(split="test"))[0] == [
        SFTExample([{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    ]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_sft_examples(tmp_path / "saved", ReadOptions(split="validation"))
    # A plain dir of data files is what load_dataset reads (its split from the file name).
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", train)
    assert len(load_sft_examples(tmp_path / "files")[0]) == 1


def test_a_hub_id_without_a_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match="trl-lib/nothing-here: cannot load it as a hub dataset"):
        load_prompts("trl-lib/nothing-here")


def test_config_accepts_the_data_keys():
    cfg = load_config(
        SFTConfig,
        overrides=[
            "data.train=trl-lib/Capybara",
            "data.split=train[:10%]",
            "data.columns={prompt: question}",
            "data.format=hub",
        ],
    )
    assert ReadOptions.of(cfg.data) == ReadOptions("hub", "train[:10%]", "", {"prompt": "question"})
