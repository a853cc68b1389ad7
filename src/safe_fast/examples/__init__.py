"""Runnable examples: ``python -m safe_fast.examples.loopback_demo``."""
