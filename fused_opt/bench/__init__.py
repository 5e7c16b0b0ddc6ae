"""The benchmark: one optimizer step of every fused_opt backend against the torch.optim
pipelines that do the same job, side by side in one run. `python -m fused_opt.bench --help`."""
