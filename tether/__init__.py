"""tether: aligning language models with human feedback.

The package, bottom layer first; each layer imports only the layers below it
(tests/test_layout.py checks this):

    core/      the maths: losses, advantages, KL, masked ops, packing, metrics (torch only)
    errors, config, hardware, data
               typed configs, the machine's precision and threads, data readers
    models/    loading LMs, tokenizers, LoRA; reward models; the training attention kernel
    runs/      run dirs, checkpoints, the shared training loop, torch.distributed
    fast/      the rollout engine and its C++ kernels, the allocator (skip on a first read:
               `rollout.generation.generate` samples the same distribution without it)
    rewards    reward functions and verifiers, with timeouts
    rollout/   sampling, the forward passes over a rollout, the actor-critic
    stages/    sft, rm, ppo (with rloo, grpo, reinforce, a2c), dpo: one loop each
    tools/     the demo, doctor, inspector, report, evaluation, demo tasks
    api        the stages as Python functions: tether.sft(...), tether.ppo(...), ...
    cli        the `tether` command, a thin layer over api

Kept import-light on purpose: `import tether` must not pull in transformers, so the CLI's
`--help` is instant and the maths modules can be imported on their own.
"""

__version__ = "0.1.0"

# The Python API (tether.api), imported on first use so that `import tether` stays light.
API = ("sft", "reward_model", "ppo", "grpo", "dpo", "run", "Result", "config_reference", "push")


def __getattr__(name: str):
    if name in API:
        import tether.api

        return getattr(tether.api, name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
