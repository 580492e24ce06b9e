"""Rollouts for online RL: sampling from the policy, the forward passes over sampled
responses (log-probs, entropies, hidden states), and the actor-critic that holds the policy,
its value function and the frozen reference.
"""
