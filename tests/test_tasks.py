"""Demo tasks, the simulated annotator, and the best-of-n / win-rate maths, by hand."""

import math

import pytest
import torch

from tether.core.kl import best_of_n_kl
from tether.core.metrics import best_of_n_mean, pairwise_agreement, win_rate
from tether.errors import TetherError
from tether.tools.tasks import (
    TASKS,
    annotator_ranking,
    annotator_utilities,
    arithmetic_gold,
    arithmetic_prompts,
    get_task,
    sentiment_prompts,
    vader_gold,
)


def test_annotator_ranks_pairs_in_bradley_terry_order():
    """Gumbel-perturbed sorting makes P(a above b) = σ((u_a − u_b)/τ) for every pair."""
    utilities, tau = torch.tensor([0.5, 0.2, -0.3]), 0.2
    generator = torch.Generator().manual_seed(0)
    draws = 6000
    above = torch.zeros(3, 3)
    for _ in range(draws):
        ranking = annotator_ranking(utilities, tau, generator)
        for i, a in enumerate(ranking):
            for b in ranking[i + 1 :]:
                above[a, b] += 1
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        expected = 1 / (1 + math.exp(-(utilities[a] - utilities[b]).item() / tau))
        assert above[a, b].item() / draws == pytest.approx(expected, abs=0.02)


def test_noiseless_annotator_sorts_by_utility():
    ranking = annotator_ranking(torch.tensor([0.1, 0.9, -0.5, 0.4]), 1e-6, torch.Generator())
    assert ranking == [1, 3, 0, 2]


def test_length_bias_adds_utility_per_word():
    u = annotator_utilities(torch.tensor([0.5, 0.2]), torch.tensor([10, 40]), length_bias=0.01)
    assert u.tolist() == pytest.approx([0.6, 0.6])


def test_vader_gold_prefers_praise():
    positive, negative = vader_gold(["p", "p"], ["A wonderful, moving film.", "Dull and awful."])
    assert positive > 0.5 and negative < -0.5


def test_arithmetic_gold_rewards_the_right_number_briefly():
    prompt = "What is 23 - 48? Reply with the number."
    responses = ["-25", "The answer is -25.", " ".join(["well"] * 20) + " -25", "25", "no idea"]
    assert arithmetic_gold([prompt] * 5, responses) == [1.0, 1.0, 0.5, 0.0, 0.0]
    with pytest.raises(TetherError, match="cannot read the question"):
        arithmetic_gold(["Tell me a joke"], ["-25"])


@pytest.mark.parametrize("make, count", [(sentiment_prompts, 400), (arithmetic_prompts, 345)])
def test_task_prompts_are_distinct_and_seeded(make, count):
    """Distinct, or a held-out prompt could also be a training prompt."""
    prompts = make(0)
    assert len(set(prompts)) == len(prompts) == count
    assert prompts == make(0) != make(1)


def test_tasks_resolve_by_name_or_module_attribute(tmp_path):
    assert get_task("arithmetic") is TASKS["arithmetic"]
    module = tmp_path / "my_tasks.py"
    module.write_text(
        "from tether.tools.tasks import Task\n"
        "poems = Task('poems', 'd', lambda seed: ['A poem.'] * 9,"
        " 'tether.tools.tasks:vader_gold')\n"
        "not_a_task = 3\n"
    )
    assert get_task(f"{module}:poems").name == "poems"
    with pytest.raises(TetherError, match=r"not a tether\.tools\.tasks\.Task"):
        get_task(f"{module}:not_a_task")
    with pytest.raises(TetherError, match="registered: arithmetic, sentiment"):
        get_task("poetry")


def test_best_of_n_mean_averages_over_every_subset():
    # selector ranks [3, 1, 2]; values [1, 2, 3]. Best-of-2 subsets: {0,1} -> 1, {0,2} -> 1,
    # {1,2} -> 3 (selector 2 beats 1): mean 5/3. Best-of-1 is the mean, best-of-3 picks #0.
    selector, values = torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[1.0, 2.0, 3.0]])
    assert best_of_n_mean(selector, values, 1) == pytest.approx(2.0)
    assert best_of_n_mean(selector, values, 2) == pytest.approx(5 / 3)
    assert best_of_n_mean(selector, values, 3) == pytest.approx(1.0)
    two_prompts = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    # first row: subsets {1,3}->3, {1,2}->2, {3,2}->3 = 8/3; second row: best of zeros = 0
    assert best_of_n_mean(two_prompts, two_prompts, 2) == pytest.approx((8 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="1 <= n <= 3"):
        best_of_n_mean(selector, values, 4)


def test_best_of_n_kl_is_log_n_minus_n_minus_one_over_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_win_rate_splits_ties():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == (
        pytest.approx((1 + 0.5 + 0 + 1) / 4)
    )


def test_pairwise_agreement_skips_gold_ties():
    # pairs (0,1): a says 0<1, b says 0<1 agree; (0,2): b tie -> skipped; (1,2): a 1>2,
    # b 1>2 agree... b = [0, 2, 0]: (1,2) b says 1 > 2, a = [0, 5, 1] says 1 > 2: agree.
    a, b = torch.tensor([[0.0, 5.0, 1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    assert pairwise_agreement(a, b) == pytest.approx(1.0)
    assert pairwise_agreement(-a, b) == pytest.approx(0.0)
    assert pairwise_agreement(torch.zeros(1, 3), b) == pytest.approx(0.5)  # a ties: ½ each
    assert math.isnan(pairwise_agreement(a, torch.zeros(1, 3)))
