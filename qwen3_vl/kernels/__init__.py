"""Hand-written CPU kernels, compiled on first use (see ``cpu_gemv``)."""
