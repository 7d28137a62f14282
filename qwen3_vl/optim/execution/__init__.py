"""Options of the execution axis: how the decode loop runs (eager, CUDA graphs, torch.compile)."""
