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


# --------------------------------------------------------------------------- TRL's way

TRL_REWARDS = """
import asyncio

def correct(completions, solution, **kwargs):
    return [1.0 if s in c else 0.0 for c, s in zip(completions, solution)]

def strict(prompts, completions):
    return [float(len(c)) for c in completions]

def opinionated(completions, **kwargs):
    return [None if "?" in c else 1.0 for c in completions]

async def slow(completions, **kwargs):
    await asyncio.sleep(0)
    return [2.0 for _ in completions]

def chat(prompts, completions, **kwargs):
    return [float(c[0]["role"] == "assistant" and p[-1]["role"] == "user")
            for p, c in zip(prompts, completions)]

def positional(a, b, c):
    return [0.0 for _ in b]
"""


@pytest.fixture
def trl_file(tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_REWARDS)
    return path


def test_a_trl_reward_is_called_by_keyword_with_the_prompt_files_columns(trl_file):
    """The bug TRL users met: f(completions, solution) called positionally got the prompts
    as completions and the responses as solutions, and scored garbage without an error."""
    term = build_term(f"{trl_file}:correct")
    term.check({"solution"})
    values, _ = CombinedReward([term])(
        ["What is 6 + 2?", "What is 3 + 3?"], ["6 + 2 = 8", "It is 5"], {"solution": ["8", "6"]}
    )
    assert values == [1.0, 0.0]


def test_a_trl_reward_that_needs_a_missing_column_is_refused_before_any_rollout(trl_file):
    term = build_term(f"{trl_file}:correct")
    with pytest.raises(RewardError, match=r"needs solution.*other fields: answer"):
        term.check({"answer"})


def test_trl_rewards_get_only_what_they_declare_none_async_and_messages(trl_file):
    strict = build_term(f"{trl_file}:strict")
    assert CombinedReward([strict])(["p"], ["abc"], {"solution": ["x"]})[0] == [3.0]
    both = CombinedReward([build_term(f"{trl_file}:opinionated"), build_term(f"{trl_file}:slow")])
    total, parts = both(["p", "q"], ["why?", "yes"])
    assert parts["opinionated".join([f"{trl_file}:", ""])] == [None, 1.0]
    assert total == [2.0, 3.0]  # no opinion adds 0
    chat = build_term(f"{trl_file}:chat")
    messages = [[{"role": "user", "content": "hi"}]]
    assert CombinedReward([chat])(messages, ["hello"])[0] == [1.0]  # completions as messages


def test_a_function_neither_way_can_call_is_refused_when_built(trl_file):
    with pytest.raises(RewardError, match=r"called tether's way.*name its completions"):
        build_term(f"{trl_file}:positional")


def test_a_grpo_run_trains_on_a_trl_reward_with_a_solution_column(tiny_model_dir, tmp_path):
    """Each completion's `solution` is its own prompt's: the reward checks that it got them
    paired right (an error otherwise), the way a verifier reads a dataset column."""
    from test_ppo import ppo_config

    from tether.runs.rundir import read_metrics
    from tether.stages.ppo import run_ppo

    words = ["apple", "river", "stone", "cloud", "light", "house", "road", "bird"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(f'{{"prompt": "Spell {w} backwards.", "solution": "{w[::-1]}"}}\n' for w in words)
    )
    reward = tmp_path / "verifier.py"
    reward.write_text(
        "def reversed_word(prompts, completions, solution, completion_ids, **kwargs):\n"
        "    for p, s, ids in zip(prompts, solution, completion_ids):\n"
        "        assert s == p.split()[1][::-1], (p, s)\n"
        "        assert all(isinstance(i, int) for i in ids)\n"
        "    return [float(s[0] in c) for c, s in zip(completions, solution)]\n"
    )
    cfg = ppo_config(
        tiny_model_dir,
        (prompts, reward),
        "algo=grpo",
        "rollout.samples_per_prompt=2",
        "train.batch_size=4",
        "train.max_steps=2",
        f"reward.terms=[{{name: '{reward}:reversed_word'}}]",
    )
    run_ppo(cfg, tmp_path / "run")
    assert [m["step"] for m in read_metrics(tmp_path / "run/metrics.jsonl")] == [1, 2]
