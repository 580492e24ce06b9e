"""Reward model on a tiny real Llama: learning, score position, normalisation, saving, CLI."""

import json

import pytest
import torch
from conftest import backbone_inputs, write_jsonl
from test_sft import run_cli

from tether.config import RMConfig, load_config
from tether.models.reward_model import RewardModel, pad_rows, sequence_scores
from tether.runs.rundir import read_metrics
from tether.stages.rm import run_rm


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, marker_data, tmp_path_factory):
    train, held_out = marker_data
    out = tmp_path_factory.mktemp("rm") / "run"
    cfg = load_config(
        RMConfig,
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.train={train}",
            f"data.eval={held_out}",
            "optim.lr=3e-3",
            "train.max_steps=40",
            "train.batch_size=16",
            "train.eval_every=20",
            "train.threads=1",
        ],
    )
    run_rm(cfg, out)
    return out


def test_tiny_rm_learns_a_marker_preference(trained_rm):
    evals = [r for r in read_metrics(trained_rm / "metrics.jsonl") if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["eval/accuracy"] >= 0.95, evals[-1]
    assert evals[-1]["eval/log_loss"] < evals[0]["eval/log_loss"]


def test_saved_rm_loads_with_transformers_and_is_normalised(trained_rm, marker_data):
    from transformers import AutoModelForSequenceClassification

    rm = RewardModel.load(str(trained_rm / "final"))
    records = [json.loads(line) for line in marker_data[1].read_text().splitlines()]
    prompts = [r["prompt"] for r in records] * 2
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    scores = rm.score(prompts, responses)
    # normalised over these very held-out responses at the end of training
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # the ecosystem convention gives the same raw scores
    hf = AutoModelForSequenceClassification.from_pretrained(trained_rm / "final", num_labels=1)
    rows = [
        rm.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in zip(prompts[:4], responses[:4], strict=True)
    ]
    for text, raw in zip(rows, rm.score(prompts[:4], responses[:4], normalize=False), strict=True):
        ids = rm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert hf(ids).logits.item() == pytest.approx(raw.item(), abs=1e-4)


def test_score_is_read_at_the_last_real_token_for_any_padding(trained_rm):
    rm = RewardModel.load(str(trained_rm / "final"))
    short, long = [5, 6, 7], [5, 6, 7, 8, 9, 10, 11]
    pad = rm.tokenizer.pad_token_id
    alone = [
        sequence_scores(rm.model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
        for r in (short, long)
    ]
    right_ids, right_mask = pad_rows([short, long], pad)
    left_ids = torch.tensor([[pad] * 4 + short, long])
    left_mask = torch.tensor([[0] * 4 + [1] * 3, [1] * 7])
    with torch.no_grad():
        right = sequence_scores(rm.model, right_ids, right_mask)
        left = sequence_scores(rm.model, left_ids, left_mask)
    expected = torch.cat(alone).detach()
    assert torch.allclose(right, expected, atol=1e-5)
    assert torch.allclose(left, expected, atol=1e-5)
    # a different last token changes the score: the head does read the end
    changed = sequence_scores(
        rm.model, torch.tensor([[5, 6, 8]]), torch.ones(1, 3, dtype=torch.long)
    )
    assert not torch.allclose(changed, alone[0])


def test_rm_eval_json_and_score_cli(trained_rm, marker_data, tmp_path):
    proc = run_cli(
        ["rm-eval", "--model", str(trained_rm / "final"), "--data", str(marker_data[1]), "--json"]
    )
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"accuracy", "log_loss", "ece", "length_corr", "n"} <= metrics.keys()
    assert metrics["n"] == 64 and metrics["accuracy"] >= 0.95
    responses = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"prompt": "the sky", "response": "a banana"},
            {"prompt": "the sky", "response": "a river"},
        ],
    )
    run_cli(
        [
            "score",
            "--model",
            str(trained_rm / "final"),
            "--data",
            str(responses),
            "--out",
            str(tmp_path / "scored.jsonl"),
        ]
    )
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert scored[0]["score"] > scored[1]["score"]
    assert scored[0]["response"] == "a banana"


def test_listwise_records_become_weighted_pairs():
    from tether.data import PreferencePair, RankedResponses, expand_rankings

    prompt = [{"role": "user", "content": "say"}]
    ranked = RankedResponses(prompt, ["r0", "r1", "r2"], ranking=[2, 0, 1])  # r2 > r0 > r1
    plain = PreferencePair(prompt, "a", "b")
    pairs = expand_rankings([ranked, plain], adjacent_only=False)
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("r2", "r0"),
        ("r2", "r1"),
        ("r0", "r1"),
        ("a", "b"),
    ]
    assert [p.weight for p in pairs] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    adjacent = expand_rankings([ranked], adjacent_only=True)
    assert [(p.chosen, p.rejected) for p in adjacent] == [("r2", "r0"), ("r0", "r1")]
    assert [p.weight for p in adjacent] == pytest.approx([0.5, 0.5])


def tiny_rm_and_ranking(model_dir):
    """A fresh (seeded) reward model on the tiny Llama, its tokenizer, and a ranking of 3."""
    from transformers import AutoModelForSequenceClassification

    from tether.data import RankedResponses
    from tether.models.loading import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    prompt = [{"role": "user", "content": "say"}]
    ranked = RankedResponses(prompt, ["one", "two words", "three more words"], ranking=[2, 0, 1])
    return tokenizer, model, ranked


def test_a_ranking_kept_whole_gives_the_loss_of_its_expanded_pairs(tiny_model_dir):
    """K responses scored once give the same Bradley-Terry loss as the K(K−1)/2 pairs the
    ranking expands to, each scored on its own (with the pairs' 1/3 weights)."""

    from tether.config import RewardLossConfig
    from tether.data import LoadReport, PreferencePair, expand_rankings
    from tether.stages.rm import pair_loss, score_items, tokenize_pairs, tokenize_ranking_pairs

    tokenizer, model, ranked = tiny_rm_and_ranking(tiny_model_dir)
    prompt = ranked.prompt
    plain = PreferencePair(prompt, "yes", "no", margin=0.5)
    report = LoadReport("x")
    whole = [tokenize_ranking_pairs(ranked, tokenizer, 64, False, report)]
    whole += tokenize_pairs([plain], tokenizer, 64, report)
    expanded = tokenize_pairs(expand_rankings([ranked, plain], False), tokenizer, 64, report)
    cfg = RewardLossConfig(center_coef=0.0)
    model.eval()
    pad_id = tokenizer.pad_token_id
    loss_whole, metrics_whole = pair_loss(whole, score_items(whole, model, pad_id, False), cfg)
    loss_pairs, metrics_pairs = pair_loss(
        expanded, score_items(expanded, model, pad_id, False), cfg
    )
    assert sum(len(x.rows) for x in whole) == 5 < sum(len(x.rows) for x in expanded) == 8
    assert loss_whole.item() == pytest.approx(loss_pairs.item(), rel=1e-5)
    assert metrics_whole["accuracy"].item() == pytest.approx(metrics_pairs["accuracy"].item())


@pytest.mark.parametrize("attention", ["sdpa", "tether"])
def test_held_out_pairs_of_a_ranking_score_each_answer_once(tiny_model_dir, attention):
    """A held-out ranking of 3 answers is 3 pairs (6 rows) but 3 distinct answers: they are
    scored once each, after one pass over their prompt where the attention runs packed rows,
    and every pair gets the scores its rows get on their own."""

    from tether.core.packing import common_prefix_length
    from tether.data import LoadReport, expand_rankings
    from tether.models.attention import use_grouped_flash_attention
    from tether.stages.rm import score_all, tokenize_pairs

    tokenizer, model, ranked = tiny_rm_and_ranking(tiny_model_dir)
    if attention == "tether":
        use_grouped_flash_attention(model)
    pairs = tokenize_pairs(expand_rankings([ranked], False), tokenizer, 64, LoadReport("x"))
    with backbone_inputs(model) as seen:
        chosen, rejected = score_all(model, pairs, 8, tokenizer.pad_token_id, False)
    answers = list({tuple(r): r for p in pairs for r in p.rows}.values())
    shared = common_prefix_length(answers)
    assert len(pairs) == 3 and len(answers) == 3
    once = shared + sum(len(r) - shared for r in answers)
    if attention == "tether":  # one packed row: the prompt, then each answer
        assert [tuple(x) for x in seen] == [(1, once)]
    else:  # padded whole rows
        assert sum(x[0] for x in seen) == 3
    for pair, c, r in zip(pairs, chosen, rejected, strict=True):
        for row, score in ((pair.chosen, c), (pair.rejected, r)):
            alone = model(input_ids=torch.tensor([row])).logits.squeeze()
            assert score.item() == pytest.approx(alone.item(), abs=1e-5)


def test_reward_model_plugs_in_as_a_reward_term(trained_rm):
    from tether.rewards import CombinedReward, build_term

    reward = CombinedReward(
        [
            build_term(f"model:{trained_rm / 'final'}", 2.0),
            build_term("regex", 1.0, {"pattern": "^a "}),
        ]
    )
    total, parts = reward(["the sky", "the sky"], ["a banana", "a river"])
    assert parts[f"model:{trained_rm / 'final'}"][0] > parts[f"model:{trained_rm / 'final'}"][1]
    assert total == pytest.approx([2 * v + 1.0 for v in parts[f"model:{trained_rm / 'final'}"]])


def test_score_groups_answers_to_one_prompt_and_keeps_their_scores(trained_rm):
    rm = RewardModel.load(str(trained_rm / "final"))
    prompts = ["the sky"] * 3 + ["a tree"] * 2 + ["the sky"]
    responses = ["a banana", "a river", "the sea", "a leaf", "a long green branch", "a cloud"]
    together = rm.score(prompts, responses, batch_size=4)  # runs of 3, 2, 1: batches 3 and 3
    alone = torch.cat([rm.score([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_a_bf16_reward_term_scores_in_bf16_on_the_reward_thread(trained_rm):
    """PPO calls rewards on a thread of their own (for the timeout), where the caller's
    autocast does not reach: the reward model enters it itself."""
    from tether.rewards import build_term, checked_call

    final = f"model:{trained_rm / 'final'}"
    prompts, responses = ["the sky"] * 3, ["a banana", "a river", "the sea"]
    fp32 = checked_call(build_term(final, args={"bf16": False}, timeout_s=60), prompts, responses)
    bf16 = checked_call(build_term(final, args={"bf16": True}, timeout_s=60), prompts, responses)
    rm = RewardModel.load(str(trained_rm / "final"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = rm.score(prompts, responses).tolist()
    assert bf16 == pytest.approx(in_autocast, abs=1e-6)
    assert bf16 != pytest.approx(fp32, abs=1e-6)
    assert bf16 == pytest.approx(fp32, abs=0.1)


def test_reward_model_loading_is_seeded_and_leaves_the_global_rng_alone(tiny_model_dir):
    from tether.config import ModelConfig
    from tether.models.loading import load_tokenizer
    from tether.models.reward_model import load_reward_backbone

    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_reward_backbone(ModelConfig(name=str(tiny_model_dir)), tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)  # a PPO run's random stream is untouched
    second = load_reward_backbone(ModelConfig(name=str(tiny_model_dir)), tokenizer, seed=7)
    assert torch.equal(first.score.weight, second.score.weight)
    hidden = first.score.weight.shape[1]  # N(0, 1/sqrt(d+1)) head, not HF's 0.02
    assert first.score.weight.std().item() == pytest.approx((hidden + 1) ** -0.5, rel=0.3)


def test_score_refuses_a_directory_as_output_before_loading(tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "response": "r"}])
    proc = run_cli(
        [
            "score",
            "--model",
            str(tmp_path / "no-model"),
            "--data",
            str(data),
            "--out",
            str(tmp_path),
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert "is a directory; --out takes a file path" in proc.stderr


def test_plackett_luce_rm_learns_a_ranking_and_is_judged_pairwise(
    tiny_model_dir, marker_data, tmp_path
):
    """Rankings of three (two markers > one > none) trained whole under Plackett-Luce; the
    held-out report is the same pairwise one as for Bradley-Terry."""
    import random

    rng = random.Random(0)
    records = []
    for _ in range(96):
        words = [rng.choice(["sun", "sky", "tree", "road", "stone"]) for _ in range(6)]
        two = " ".join(["banana", *words[1:4], "banana", *words[5:]])
        one = " ".join(["banana", *words[1:]])
        records.append({"prompt": "say", "responses": [one, " ".join(words), two]})
        records[-1]["ranking"] = [2, 0, 1]
    train = write_jsonl(tmp_path / "ranked.jsonl", records)
    cfg = load_config(
        RMConfig,
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.train={train}",
            f"data.eval={marker_data[1]}",
            "reward.listwise_loss=plackett_luce",
            "optim.lr=3e-3",
            "train.max_steps=30",
            "train.batch_size=8",
            "train.threads=1",
        ],
    )
    run_rm(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run/metrics.jsonl")
    assert "train/top1_accuracy" in metrics[1]
    assert metrics[-1]["eval/accuracy"] >= 0.9, metrics[-1]


def test_normalisation_without_held_out_uses_training_rankings(tiny_model_dir, tmp_path):
    records = [
        {"prompt": "say", "responses": [f"one {w}", f"two {w} {w}", w], "ranking": [1, 0, 2]}
        for w in ("sun", "sky", "tree", "road", "stone", "bird")
    ]
    train = write_jsonl(tmp_path / "ranked.jsonl", records)
    overrides = [f"model.name={tiny_model_dir}", f"data.train={train}", "data.eval_fraction=0"]
    overrides += ["reward.listwise_loss=plackett_luce", "train.max_steps=2", "train.threads=1"]
    overrides += ["train.precision=fp32"]  # scored below in fp32: the same numbers
    final = run_rm(load_config(RMConfig, None, overrides), tmp_path / "run")
    rm = RewardModel.load(str(final))
    rows = [r for rec in records for r in rec["responses"]]
    scores = rm.score(["say"] * len(rows), rows)
    assert rm.std > 0 and abs(scores.mean().item()) < 1e-3  # mean 0 over those 18 responses


def test_common_prefix_length_leaves_every_row_its_last_token():
    from tether.core.packing import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # not all of the shorter row
    assert common_prefix_length([[7, 2], [1, 2]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 2  # a row alone: all but its last token


@pytest.mark.parametrize("attention", ["tether", "tether-checkpointed", "sdpa"])
def test_grouped_scores_run_packed_and_equal_whole_rows(tiny_model_dir, attention):
    """Answers packed after their prompt, run once, in one row without padding give the
    scores and the gradients of scoring every whole row padded, under gradient checkpointing
    too; with attention that is not tether's the rows run padded, and still score the same."""
    from transformers import AutoModelForSequenceClassification

    from tether.models.attention import use_grouped_flash_attention
    from tether.models.reward_model import grouped_sequence_scores

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, attn_implementation="sdpa"
    )
    model.config.pad_token_id = 0
    if attention.startswith("tether"):
        use_grouped_flash_attention(model)
    if attention == "tether-checkpointed":
        model.gradient_checkpointing_enable()
        model.train()
    prompt_a, prompt_b = list(range(10, 40)), list(range(50, 62))
    long_answer = list(range(100, 160))
    groups = [
        [[*prompt_a, 5, 6, 7], [*prompt_a, 8], [*prompt_a, *long_answer], [*prompt_a, 3]],
        [[*prompt_b, 4, 4], [*prompt_b, 4, 4, 2]],  # one answer the start of the other
        [[7, *prompt_b], [8, *prompt_b, 1]],  # cut from the left at different points
    ]
    with backbone_inputs(model) as packed_seen:
        grouped = grouped_sequence_scores(model, groups, pad_id=0)
    grouped.pow(2).sum().backward()
    grouped_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ids, mask = pad_rows([r for g in groups for r in g], 0)
    whole = sequence_scores(model, ids, mask)
    whole.pow(2).sum().backward()
    # prompt a once (30) + its answers (3 + 1 + 60 + 1); prompt b and 4 (13) + 1 + 2;
    # the two rows that share nothing, whole (13 + 14)
    real_tokens = 30 + 65 + 13 + 3 + 27
    expected = [(1, real_tokens)] if attention.startswith("tether") else [ids.shape]
    assert [tuple(x) for x in packed_seen] == [tuple(x) for x in expected]
    assert grouped.detach() == pytest.approx(whole.detach(), abs=1e-5)
    for p, g in zip(model.parameters(), grouped_grads, strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)


def test_the_frozen_lower_layers_run_once_per_item_over_the_reward_models_training(
    tiny_model_dir,
):
    """With adapters on the top layer only, an item's lower-layer states are computed in its
    first step and reused after (`TrunkStates`): scores and adapter gradients are those of
    whole packed passes, in any order of items, and the lower layer runs once per item."""
    from tether.config import LoraConfig, ModelConfig
    from tether.models.loading import load_tokenizer
    from tether.models.reward_model import (
        TrunkStates,
        grouped_sequence_scores,
        load_reward_backbone,
    )

    tokenizer = load_tokenizer(str(tiny_model_dir))
    lora = LoraConfig(enabled=True, r=4, alpha=8, top_layers=1)
    model = load_reward_backbone(ModelConfig(name=str(tiny_model_dir), lora=lora), tokenizer, 0)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():  # adapters that act (peft starts them at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompt = list(range(10, 30))
    items = {
        4: [[*prompt, 5, 6, 7], [*prompt, 8], [*prompt, 3, 3]],
        9: [[7, 8, 9, 10], [11, 12, 13]],  # no shared prefix: each row whole
        2: [[*prompt, 40], [*prompt, 41, 42]],
    }
    lower = model.get_base_model().model.layers[0]
    rows_seen = []
    lower.register_forward_hook(lambda _, args, __: rows_seen.append(args[0].shape[1]))
    trunks = TrunkStates(model, keep_bytes=2**20)
    assert trunks.depth == 1
    adapters = [p for p in model.parameters() if p.requires_grad]

    # the lower layer's tokens per call: items 4 (prompt once, 20 + 3 + 1 + 2) and 9 (whole
    # rows, 4 + 3); then item 2 alone (20 + 1 + 2); then nothing
    for keys, trunk_tokens in (([4, 9], [33]), ([2, 4, 9], [23]), ([9, 2], [])):
        groups = [items[k] for k in keys]
        rows_seen.clear()
        cached = grouped_sequence_scores(model, groups, 0, trunks, keys)
        assert rows_seen == trunk_tokens
        whole = grouped_sequence_scores(model, groups, 0)
        assert cached.detach() == pytest.approx(whole.detach(), abs=1e-5)
        cached_grads = torch.autograd.grad(cached.pow(2).sum(), adapters)
        whole_grads = torch.autograd.grad(whole.pow(2).sum(), adapters)
        for a, b in zip(cached_grads, whole_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # with no memory to keep them in, every step runs its items' lower layers, to the same end
    unkept = TrunkStates(model, keep_bytes=0)
    for keys in ([4, 9], [9, 2]):
        rows_seen.clear()
        scores = grouped_sequence_scores(model, [items[k] for k in keys], 0, unkept, keys)
        assert len(rows_seen) == 1 and not unkept.states
        whole = grouped_sequence_scores(model, [items[k] for k in keys], 0)
        assert scores.detach() == pytest.approx(whole.detach(), abs=1e-5)
    everywhere = LoraConfig(enabled=True, r=4, alpha=8)
    plain = load_reward_backbone(
        ModelConfig(name=str(tiny_model_dir), lora=everywhere), tokenizer, 0
    )
    assert TrunkStates(plain, keep_bytes=2**20).depth == 0
