"""Reliability trials: scenarios run many times with random timing against a real `ckptd`, each
trial checked byte by byte against what the trainer wrote (see runner.py and docs/reliability.md).

The short run is test_trials.py, in the default suite; the full run is
`.venv/bin/python -m tests.reliability --full`, which writes docs/reliability.md.
"""
