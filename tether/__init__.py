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
    cli        the `tether` command

Kept import-light on purpose: `import tether` must not pull in transformers, so the CLI's
`--help` is instant and the maths modules can be imported on their own.
"""

__version__ = "0.1.0"
