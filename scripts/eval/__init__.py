"""The detection evaluation harness behind ``scripts/eval_detection.py``: the labelled benchmark (edits,
logos, natural photos, negatives), running the real CLI on it, metrics, tuning and reports."""
