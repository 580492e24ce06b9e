"""The Python API: each stage as a function, for notebooks and scripts.

    import tether
    result = tether.sft(data=[{"prompt": "Hi", "completion": "Hello!"}], train={"max_steps": 10})
    result = tether.grpo(model=result.final, data="prompts.jsonl", reward=my_verifier)
    print(result.metrics["reward/score_mean"], result.run_dir)

A stage takes a config object (or a YAML path), then keyword values as its YAML would give
them (`optim={"lr": 1e-5}`, `algo="rloo"`), checked exactly as the CLI checks its config;
data as a path, a list of dicts or a `datasets.Dataset`; rewards as callables, specs or
reward model dirs. The `tether` command is a thin layer over `run`.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.errors import TetherError


@dataclass(frozen=True)
class Stage:
    help: str
    config: str  # "module:Class"
    runner: str  # "module:function(cfg, out, resume) -> Path"
    # Where the --model / --data / --max-steps shortcuts write.
    model_key: str = "model.name"
    data_key: str = "data.train"
    steps_key: str = "train.max_steps"


STAGES: dict[str, Stage] = {
    "sft": Stage(
        help="supervised fine-tuning on chat, prompt/completion or text data",
        config="tether.config:SFTConfig",
        runner="tether.stages.sft:run_sft",
    ),
    "rm": Stage(
        help="train a reward model on preference pairs or rankings",
        config="tether.config:RMConfig",
        runner="tether.stages.rm:run_rm",
    ),
    "ppo": Stage(
        help="online PPO against a reward (model or function) with a KL penalty to a reference",
        config="tether.config:PPOConfig",
        runner="tether.stages.ppo:run_ppo",
    ),
    "grpo": Stage(
        help="GRPO: k samples per prompt, group-whitened advantages, KL as a loss term",
        config="tether.config:GRPOConfig",
        runner="tether.stages.ppo:run_ppo",
    ),
    "dpo": Stage(
        help="direct preference optimisation (DPO, IPO, hinge) against a frozen reference",
        config="tether.config:DPOConfig",
        runner="tether.stages.dpo:run_dpo",
    ),
}


def load_target(target: str):
    """`module:name`, imported now (the stages load torch; the CLI's --help must not)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def config_class(stage: str) -> type:
    if stage not in STAGES:
        raise TetherError(f"no stage '{stage}'; the stages are {list(STAGES)}")
    return load_target(STAGES[stage].config)


@dataclass(frozen=True)
class Result:
    """What a stage leaves: its run dir, the trained model's dir, and the last logged value
    of every metric (the final evaluation's included)."""

    run_dir: Path
    final: Path
    metrics: dict[str, float]


def run(stage: str, config: Any, out: str | Path | None = None, resume: bool = False) -> Result:
    """Run `stage` on a validated config into `out` (default: runs/STAGE-TIMESTAMP)."""
    from tether.runs.rundir import last_values

    out = run_dir_of(stage, out, resume)
    final = load_target(STAGES[stage].runner)(config, out, resume=resume)
    return Result(out, Path(final), last_values(out / "metrics.jsonl"))


def run_dir_of(stage: str, out: str | Path | None, resume: bool) -> Path:
    """`out`, or a new runs/STAGE-TIMESTAMP; a resume must name the run it continues."""
    if out is not None:
        return Path(out)
    if resume:
        raise TetherError("--resume needs --out RUN_DIR (the run to continue; in Python, out=...)")
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------- the stages

# A path, records (a list of dicts or a datasets.Dataset), or a dict: the `data` section.
Data = str | Path | list[dict[str, Any]] | dict[str, Any] | Any
Reward = str | Callable[..., Any]


def sft(config: Any = None, *, out=None, resume=False, data=None, eval_data=None, **values):
    """Supervised fine-tuning. `data`: messages, prompt/completion or text records."""
    return _stage("sft", config, out, resume, data, eval_data, values)


def reward_model(
    config: Any = None, *, out=None, resume=False, data=None, eval_data=None, **values
):
    """A reward model on preference pairs or rankings."""
    return _stage("rm", config, out, resume, data, eval_data, values)


def ppo(config: Any = None, *, out=None, resume=False, data=None, reward=None, gold=None, **values):
    """Online policy optimisation (`algo` = ppo, rloo, grpo, reinforce or a2c) on prompts
    against `reward`: a callable (tether's `f(prompts, responses)` or TRL's
    `f(completions, **columns)`), a spec (`module:function`, `model:RM_DIR`, a built-in), or
    a list of them or of (reward, weight) pairs. `gold`: a judge logged, never trained on."""
    return _stage("ppo", config, out, resume, data, None, values, reward, gold)


def grpo(
    config: Any = None, *, out=None, resume=False, data=None, reward=None, gold=None, **values
):
    """GRPO: `ppo` with GRPO's defaults (4 samples per prompt, group-whitened advantages)."""
    return _stage("grpo", config, out, resume, data, None, values, reward, gold)


def dpo(config: Any = None, *, out=None, resume=False, data=None, eval_data=None, **values):
    """Direct preference optimisation (DPO, IPO, hinge) against a frozen reference."""
    return _stage("dpo", config, out, resume, data, eval_data, values)


def _stage(
    stage: str,
    config: Any,
    out: str | Path | None,
    resume: bool,
    data: Data | None,
    eval_data: Data | None,
    values: dict[str, Any],
    reward: Reward | Iterable | None = None,
    gold: Reward | None = None,
) -> Result:
    from tether.config import build_config, load_config

    cls = config_class(stage)
    out = run_dir_of(stage, out, resume)
    if isinstance(config, str | Path):
        config = load_config(cls, config)
    values = dict(values)
    # A string where the YAML has a section is that section's main key: model="DIR" is
    # model={"name": "DIR"}, data=[...] / data="FILE" is data={"train": ...}; a dict is the
    # section itself.
    if isinstance(values.get("model"), str | Path):
        values["model"] = {"name": str(values["model"])}
    records: dict[Path, list[dict[str, Any]]] = {}
    for key, given in (("train", data), ("eval", eval_data)):
        if isinstance(given, dict):
            values["data"] = {**values.get("data", {}), **given}
        elif given is not None:
            source = given
            if not isinstance(given, str | Path):  # records: kept in the run dir
                source = out / "data" / f"{key}.jsonl"
                records[source] = _records(given)
            values["data"] = {**values.get("data", {}), key: str(source)}
    if isinstance(reward, dict):
        values["reward"] = {**values.get("reward", {}), **reward}
    elif reward is not None:
        values["reward"] = {**values.get("reward", {}), "terms": reward_terms(reward)}
    if gold is not None:
        values["reward"] = {**values.get("reward", {}), "gold": _spec(gold)}
    config = build_config(cls, config, values)  # checked before anything is written
    for path, rows in records.items():
        _write_records(path, rows)
    return run(stage, config, out, resume)


def _records(data: Any) -> list[dict[str, Any]]:
    """A list of dicts, or a `datasets.Dataset`'s rows."""
    records = data.to_list() if hasattr(data, "to_list") else data
    if not isinstance(records, list):
        raise TetherError(
            f"data must be a path, a list of dicts or a datasets.Dataset, not {type(data).__name__}"
        )
    return records


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Records given as Python objects, kept in the run dir as JSONL: the run reads them as
    the CLI would (errors name their line), and a resume reads the same records."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        raise TetherError(f"{path} holds other records than this run was given; use a new out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _spec(reward: Reward) -> str:
    from tether.rewards import spec_of

    if isinstance(reward, str):
        return reward
    if isinstance(reward, Path):
        return f"model:{reward}"
    if callable(reward):
        return spec_of(reward)
    raise TetherError(f"a reward is a callable or a spec string, not {type(reward).__name__}")


def reward_terms(reward: Reward | Iterable) -> list[dict[str, Any]]:
    """`reward.terms` from a reward, a list of rewards, (reward, weight) pairs, or term dicts."""
    items = [reward] if isinstance(reward, str | Path) or callable(reward) else list(reward)
    terms = []
    for item in items:
        if isinstance(item, dict):
            terms.append({**item, "name": _spec(item["name"])})
        elif isinstance(item, tuple):
            fn, weight = item
            terms.append({"name": _spec(fn), "weight": weight})
        else:
            terms.append({"name": _spec(item)})
    return terms


def config_reference(stage: str) -> str:
    """Every config key of `stage` with its default and doc, as loadable, commented YAML."""
    from tether.config import config_reference as reference

    return reference(config_class(stage))


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """A run's final/ (model, tokenizer, model card, LoRA adapter) to the Hugging Face Hub."""
    from tether.tools.hub import push as upload

    return upload(run_dir, repo_id, private)
