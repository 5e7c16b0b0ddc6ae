"""The training example: a short run with ours and with the torch.optim loop gives loss
curves that agree closely (same math on FP32 masters; only rounding differs)."""
import os
import sys

import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import train_digits  # noqa: E402


def test_loss_curves_agree(tmp_path):
    runs = train_digits.main(["--steps", "100", "--device", "cpu", "--plot", str(tmp_path / "loss.png")])
    ours, theirs = runs["fused_opt"][0], runs["torch.optim"][0]
    assert len(ours) == len(theirs) == 100
    assert ours[0] == theirs[0]  # same model, same first batch
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 0.05 * max(theirs)
    assert sum(ours[-10:]) < 0.7 * sum(ours[:10])  # it learns
    assert (tmp_path / "loss.png").exists()
