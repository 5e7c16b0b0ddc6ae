"""The benchmark: one optimizer step of every fused_opt backend against the torch.optim
pipelines of SPEC §5, side by side in one run. `python -m fused_opt.bench --help`."""
