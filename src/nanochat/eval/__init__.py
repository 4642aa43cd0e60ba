"""Evaluation: bits per byte, CORE, the chat tasks and pass@k, as plain evaluators.

The same evaluator objects run during training (wrapped by `nanochat.callbacks.EvalCallback`) and standalone
(`nanochat eval`), so a metric is computed identically in both.
"""
