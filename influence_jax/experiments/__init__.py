"""The experiment workflow on top of the engine: hyperparameter sweeps (sweep.py), time-respecting
cross-validation (cv.py) and feature selection by influence (selection.py).

trials.py holds what they share: config overrides, configs written as Python files that
`main.py` accepts, and trials run in their own workdirs with atomically written result files,
so that any of them resumes after an interruption without rerunning finished work.
"""
