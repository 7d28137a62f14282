"""Options of the memory axis, one module each (registered in qwen3_vl/optim/registry.py)."""
