"""Shared code of the demo models in deploy/models (imported by each model.py)."""
