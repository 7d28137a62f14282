"""Validation and benchmark harness: fingerprint -> matrix -> suites -> results -> gate/dashboard."""
