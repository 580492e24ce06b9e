"""Tools around the stages: the end-to-end demo and its tasks, the run doctor, the rollout
inspector, the HTML report, and reward-model evaluation.
"""
