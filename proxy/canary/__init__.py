"""Canary rollouts: traffic split, gates on evidence, state shared by replicas in Redis."""
