"""The training stages, one readable loop each: `sft`, `rm` (reward model), `ppo` (online RL:
PPO, A2C, RLOO, GRPO, REINFORCE) and `dpo` (DPO, IPO, hinge). Each calls the maths in
`tether.core` and the shared loop in `tether.runs.training`; none re-derives either.
"""
