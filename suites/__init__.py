"""Latency, memory and accuracy suites run by the harness."""
