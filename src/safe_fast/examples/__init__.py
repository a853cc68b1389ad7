"""Runnable examples: ``python -m safe_fast.examples.loopback_demo``,
``python -m safe_fast.examples.cluster_node``."""
