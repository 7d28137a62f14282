"""Hardware: the device a model runs on (``device``), what the machine is (``detect``), the profiles
that say what to run on each class of machine (``profiles``), ``"auto"`` choices (``auto``) and
running under a weaker profile's constraints (``emulate``)."""

from qwen3_vl.hardware.device import DTYPES, dtype_name, storage_and_compute, target_for
from qwen3_vl.hardware.profiles import PROFILES, Profile, get_profile

__all__ = ["DTYPES", "PROFILES", "Profile", "dtype_name", "get_profile", "storage_and_compute", "target_for"]
