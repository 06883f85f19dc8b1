"""Tests against a real local Slurm cluster (started by the session fixture in conftest.py)."""
