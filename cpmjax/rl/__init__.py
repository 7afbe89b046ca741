"""Reinforcement learning with verifiable rewards: GRPO with DAPO's techniques and MiniCPM4's
chunk-wise rollout on the serving engine (MiniCPM4 report, arXiv 2506.07900 §3.2).

Modules: ``rewards`` (reward functions, DAPO's soft overlong penalty), ``advantage`` (group
normalisation, dynamic sampling), ``loss`` (clipped policy gradient, dual-clip, KL, the RL
gradient function for the training system's update step), ``buffer`` (trajectories, groups, the
replay buffer of unfinished ones), ``rollout`` (chunk-wise generation through the scheduler),
``batch`` (padded train batches), ``config`` (defaults and validation), ``trainer`` (the loop).
"""
