import pytest

from tether.errors import RewardError
from tether.rewards import CombinedReward, RewardTerm, build_term

PROMPTS = ["What is 2 plus 3?", "What is 4 times 5?"]


def test_builtins_and_weighted_sum():
    reward = CombinedReward(
        [
            build_term("regex", 2.0, {"pattern": r"Answer: \d+"}),
            build_term("length", 0.5),
            build_term("exact_answer", 1.0, {"answers": {PROMPTS[0]: "5", PROMPTS[1]: "20"}}),
        ]
    )
    total, parts = reward(PROMPTS, ["It is 5. Answer: 5", "maybe 21"])
    assert parts == {"regex": [1.0, 0.0], "length": [5.0, 2.0], "exact_answer": [1.0, 0.0]}
    assert total == [2.0 + 2.5 + 1.0, 0.0 + 1.0 + 0.0]


def test_function_from_a_file_path(tmp_path):
    (tmp_path / "my_reward.py").write_text(
        "def shout(prompts, responses):\n    return [r.count('!') for r in responses]\n"
    )
    term = build_term(f"{tmp_path}/my_reward.py:shout")
    assert CombinedReward([term])(PROMPTS, ["hi!!", "no"])[0] == [2.0, 0.0]


def test_function_from_a_module():
    term = build_term("tether.rewards:length_reward", args={"unit": "chars"})
    assert term.fn(PROMPTS, ["abc", ""]) == [3.0, 0.0]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda p, r: 1 / 0, r"reward 'bad' raised ZeroDivisionError"),
        (lambda p, r: [1.0], r"reward 'bad' returned 1 values for 2 responses"),
        (lambda p, r: [1.0, float("nan")], r"gave nan for sample 1: prompt 'What is 4 times 5\?'"),
        (lambda p, r: [1.0, "high"], r"gave 'high' for sample 1"),
    ],
)
def test_broken_rewards_name_the_sample(fn, message):
    with pytest.raises(RewardError, match=message):
        CombinedReward([RewardTerm("bad", fn)])(PROMPTS, ["a", "b"])


def test_bad_specs_are_clear():
    with pytest.raises(RewardError, match="module:function"):
        build_term("nocolon")
    with pytest.raises(RewardError, match="does not exist"):
        build_term("missing.py:f")
    with pytest.raises(RewardError, match="cannot import reward module"):
        build_term("no_such_module_xyz:f")
    with pytest.raises(RewardError, match="no reference answer"):
        build_term("exact_answer", args={"answers": {}}).fn(PROMPTS, ["1", "2"])


def test_missing_eos_rule_subtract_replace_none() -> None:
    import torch

    from tether.rewards import apply_missing_eos

    scores = torch.tensor([2.0, 2.0, -0.5])
    ended = torch.tensor([True, False, False])
    assert apply_missing_eos(scores, ended, "subtract", 1.0).tolist() == [2.0, 1.0, -1.5]
    assert apply_missing_eos(scores, ended, "replace", 1.0).tolist() == [2.0, -1.0, -1.0]
    assert apply_missing_eos(scores, ended, "none", 1.0).tolist() == [2.0, 2.0, -0.5]
    with pytest.raises(ValueError, match="subtract, replace, none"):
        apply_missing_eos(scores, ended, "drop", 1.0)
