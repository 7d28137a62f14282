"""Options of the attention axis, one module each (registered in qwen3_vl/optim/registry.py)."""
