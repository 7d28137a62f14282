"""Hardware detection: what device a model runs on and what it can do."""

from qwen3_vl.hardware.device import DTYPES, dtype_name, storage_and_compute, target_for

__all__ = ["DTYPES", "dtype_name", "storage_and_compute", "target_for"]
