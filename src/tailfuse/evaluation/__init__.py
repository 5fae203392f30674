"""Stage 8, evaluate: downstream classifiers on real vs augmented training sets, metrics, image quality.

The protocol is documented in ``harness.py``; ``run_evaluate`` is the entry point, ``cli_args`` the command.
"""
