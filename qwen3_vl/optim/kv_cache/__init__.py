"""Options of the kv_cache axis, one module each (registered in qwen3_vl/optim/registry.py)."""
