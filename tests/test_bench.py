"""The benchmark runs end to end on a tiny size and writes a record with the promised fields."""
import json

import fused_opt

import pytest
import torch

from fused_opt.bench.__main__ import main


def test_quick_benchmark_writes_record(tmp_path, capsys):
    main(["--quick", "--repeats", "2", "--steps", "1", "--dtypes", "fp16", "--out", str(tmp_path)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = json.loads((tmp_path / f"bench-{device}.json").read_text())
    for key in ("device", "date", "torch", "copy_gb_s", "rows", "fused_opt"):
        assert key in record
    contenders = {r["contender"] for r in record["rows"]}
    assert "fused_opt[torch]" in contenders
    assert {"torch.optim.SGD(for-loop)", "torch.optim.SGD(foreach)", "torch.optim.SGD(fused)"} <= contenders
    # AdamW rows beside SGD's, against torch's AdamW pipelines and torch AMP with fused AdamW
    assert {"torch.optim.AdamW(for-loop)", "torch.optim.AdamW(foreach)", "torch.optim.AdamW(fused)",
            "GradScaler + AdamW(fused) on FP32 params"} <= contenders
    assert {r["optimizer"] for r in record["rows"]} == {"sgd", "adamw"}
    assert {r["bytes_per_param"] for r in record["rows"] if r["contender"] == "fused_opt[torch]"} == {22, 30}
    for row in record["rows"]:
        assert row["time_ms"] > 0 and row["gb_s"] > 0 and row["min_ms"] <= row["time_ms"] <= row["max_ms"]
    out = capsys.readouterr().out
    # rows are printed as they finish, before the report, which starts with the summary
    assert out.index("    fused_opt[torch]") < out.index("| optimizer | workload | dtype | job | params / tensors | fastest")
    report = (tmp_path / f"bench-{device}.md").read_text().splitlines()
    assert report[2].startswith("| optimizer | workload | dtype | job | params / tensors | fastest fused_opt")
    assert 0 < record["peak_rss_gb"] < 8
    # every row of ours was timed paired with the fastest torch pipeline
    assert all(r["speedup_vs_best_torch_paired"] is not None for r in record["rows"] if r["contender"].startswith("fused_opt"))
    # the torch pipelines were each timed alone: they report no paired ratio
    assert all(r["speedup_vs_best_torch_paired"] is None for r in record["rows"] if not r["contender"].startswith("fused_opt"))
    # the FSDP2 rows: 2 processes (CPU), ours against torch.optim on the same shards, in one run
    (fsdp2,) = record["fsdp2"]
    assert fsdp2["world"] == (2 if device == "cpu" else min(2, torch.cuda.device_count())) and fsdp2["tensors"] == 7
    names = {r["name"] for r in fsdp2["rows"]}
    assert {"torch.optim.AdamW fused", "torch.optim.AdamW foreach", "torch.optim.SGD foreach", "fused_opt AdamW",
            "fused_opt SGD"} <= names
    from fused_opt.bench.fsdp2 import HOST_ONLY
    assert HOST_ONLY in names and "sharding_adds_host_ms" in fsdp2
    for r in fsdp2["rows"]:  # the host-only row is not a valid step: no speedup claimed for it
        assert r["step_ms"] > 0 and (r["speedup"] is None) == (not r["name"].startswith("fused_opt") or r["name"] == HOST_ONLY)
    assert "FSDP2, " in (tmp_path / f"bench-{device}.md").read_text()
    # the Muon and MuSGD rows: torch's pipelines and ours, in the same run
    assert {r["optimizer"] for r in record["muon"]} == {"muon", "musgd"}
    assert "Muon and MuSGD, BF16 params:" in (tmp_path / f"bench-{device}.md").read_text()


def test_quick_fp32_benchmark_pairs_each_job_with_its_own_torch_pipeline(tmp_path):
    """FP32 params (the autocast loop): with and without an EMA, against GradScaler + clip +
    SGD/AdamW (+ timm's foreach-lerp EMA); memory measured for both sides."""
    main(["--quick", "--repeats", "2", "--steps", "1", "--dtypes", "fp32", "--optimizers", "sgd", "--no-muon", "--out",
          str(tmp_path)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = json.loads((tmp_path / f"bench-{device}.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"fp32"} and {r["job"] for r in rows} == {"step", "step + EMA"}
    theirs = {r["contender"]: r for r in rows if not r["contender"].startswith("fused_opt")}
    assert set(theirs) == {"GradScaler + clip + SGD(foreach)", "GradScaler + clip + SGD(fused)",
                           "GradScaler + clip + SGD(foreach) + EMA", "GradScaler + clip + SGD(fused) + EMA"}
    ours = {r["contender"]: r for r in rows if r["contender"].startswith("fused_opt")}
    assert {"fused_opt[native] + EMA", "fused_opt[native] flat_grads + EMA(bf16)"} <= set(ours)
    for name, r in ours.items():
        assert r["job"] == ("step + EMA" if "EMA" in name else "step")
        assert r["bytes_per_param"] == 24 + (8 if name.endswith("+ EMA") else 4 if name.endswith("(bf16)") else 0)
        # params 4 B, momentum 4, the EMA 4 (FP32) or 2 (BF16), from the storages
        expected = 8 + (4 if name.endswith("+ EMA") else 2 if name.endswith("(bf16)") else 0)
        assert abs(r["memory_per_param"] - expected) < 0.1, (name, r["memory_per_param"])
        assert r["speedup_vs_best_torch_paired"] is not None
    assert theirs["GradScaler + clip + SGD(fused) + EMA"]["memory_per_param"] == 12.0


def test_records_go_to_an_untracked_folder_unless_asked(monkeypatch, tmp_path):
    import fused_opt.bench.__main__ as bench
    seen = {}
    monkeypatch.setattr(bench, "run", lambda args, emit=print: seen.setdefault("out", args.out) and {})
    monkeypatch.setattr(bench, "table", lambda record: "")
    monkeypatch.chdir(tmp_path)
    for argv, expected in (([], "bench-out"), (["--record"], "bench/results")):
        seen.clear()
        try:
            bench.main(["--quick", "--no-muon", *argv])
        except (KeyError, TypeError):
            pass  # the stubbed record has nothing to write: only where it would go is checked
        assert seen["out"] == expected


def test_quick_training_iteration_benchmark_writes_record(tmp_path):
    """--train: whole iterations, every contender, the step's share and the speedups. The CNN
    only (--only): BF16 attention on a CPU without BF16 instructions takes minutes a round."""
    main(["--train", "--quick", "--only", "CNN", "--out", str(tmp_path)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = json.loads((tmp_path / f"train-{device}-CNN.json").read_text())
    rows = record["rows"]
    assert {r["model"] for r in rows} == {"ResNet-style CNN"} and record["commit"]
    assert {r["contender"] for r in rows} == {"fused_opt", "torch AMP", "torch masters", "fused_opt AMP",
                                              "torch AMP + EMA", "fused_opt AMP + EMA"}
    for r in rows:
        assert 0 < r["optimizer_ms"] < r["iteration_ms"] and 0 < r["optimizer_share"] < 1
    assert all(set(r["iteration_speedup_of_fused"]) == {"torch AMP", "torch masters"}
               for r in rows if r["contender"] == "fused_opt")
    assert all(set(r["iteration_speedup_of_fused"]) == {"torch AMP + EMA"}
               for r in rows if r["contender"] == "fused_opt AMP + EMA")


def test_quick_bf16_benchmark_has_compressed_rows(tmp_path):
    """Compressed masters and state: their own rows, with the bytes they move and hold."""
    main(["--quick", "--repeats", "2", "--steps", "1", "--dtypes", "bf16", "--no-muon", "--out", str(tmp_path)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = json.loads((tmp_path / f"bench-{device}.json").read_text())
    largest = max(record["rows"], key=lambda r: r["params"])["workload"]  # (small tensors pad their last block)
    rows = {(r["optimizer"], r["contender"]): r for r in record["rows"]
            if r["contender"].startswith("fused_opt[native]") and r["workload"] == largest}
    # AdamW: exp_avg in 1-byte codes (-5.75 B/param moved), exp_avg_sq in 2-byte codes (-3.75)
    for optimizer, fp32, smallest_moved, smallest_held in (("sgd", 22, 22 - 4 - 5.75, 4.125),
                                                           ("adamw", 30, 30 - 4 - 5.75 - 3.75, 6.25)):
        default = rows[(optimizer, "fused_opt[native]")]
        small = rows[(optimizer, "fused_opt[native] remainder8 int8 state")]
        assert default["bytes_per_param"] == fp32 and small["bytes_per_param"] == smallest_moved
        assert small["memory_per_param"] == pytest.approx(smallest_held, abs=0.02)  # from the storages
        assert default["memory_per_param"] == pytest.approx(10 if optimizer == "sgd" else 14, abs=0.02)
        assert rows[(optimizer, "fused_opt[native] bf16 state")]["memory_per_param"] < default["memory_per_param"]


def test_the_main_job_is_representative_and_the_full_sweep_is_behind_a_flag():
    """`make bench` (no flag): every optimizer, dtype and job, on a bandwidth-bound sweep, a
    real model and a host-bound many-tensor case, with torch's fast pipelines and our first
    modes; --full adds the size sweep and every mode."""
    import fused_opt.bench.__main__ as bench
    from fused_opt.bench.contenders import Model, factories, representative
    cpu = torch.device("cpu")
    default = [w for w, _ in bench.plan(cpu, quick=False)]
    assert default == ["sweep 16M", "ResNet-50", "10,000 x 8"]
    assert [w for w, _ in bench.fp32_plan(cpu, quick=False)] == ["ResNet-50"]
    full = [w for w, _ in bench.plan(cpu, quick=False, full=True)]
    assert set(default) < set(full) and len(full) > len(default)
    for optimizer in ("sgd", "adamw"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            baselines, ours = factories(Model([(8,), (5, 3)], dtype, cpu), cpu, False, optimizer)
            kept_b, kept_o = representative(baselines), representative(ours)
            assert set(kept_b) < set(baselines) or dtype == torch.float32
            assert "fused_opt[native]" in kept_o and "fused_opt[native] flat_grads" in kept_o
            assert not any("torch]" in name for name in kept_o)  # the oracle is no contender
            jobs = {b().job for b in kept_b.values()}
            assert jobs == {b().job for b in baselines.values()}  # every job keeps its torch pipelines
            if dtype == torch.bfloat16:
                assert {"fused_opt[native] remainder", "fused_opt[native] remainder8 int8 state"} <= set(kept_o)
            if dtype == torch.float32:
                assert {"fused_opt[native] + EMA", "fused_opt[native] flat_grads + EMA"} <= set(kept_o)


def test_report_shows_the_spread_and_marks_rows_it_makes_meaningless(tmp_path, capsys):
    main(["--quick", "--repeats", "3", "--steps", "1", "--dtypes", "bf16", "--optimizers", "sgd", "--no-muon",
          "--out", str(tmp_path)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = json.loads((tmp_path / f"bench-{device}.json").read_text())
    for r in record["rows"]:
        assert r["spread"] >= 0 and (r["noisy"] is None) == (r["spread"] <= 0.5)
    report = (tmp_path / f"bench-{device}.md").read_text()
    assert "| spread |" in report and "Spread: max/min - 1 of the repeats" in report
    import fused_opt.bench.__main__ as bench
    rows = [dict(r, noisy=None, over_copy=False) for r in record["rows"]]
    rows[-1]["noisy"], rows[-1]["over_copy"] = "the rounds' ratios run from 1.00x to 9.00x", True
    note = bench.noise_note(dict(record, rows=rows))
    assert f"1 of {len(rows)} rows are marked !" in note and "9.00x" in note and "1 rows are marked ?" in note


def test_the_commit_is_recorded_or_said_unknown(monkeypatch):
    import subprocess
    import fused_opt.bench.__main__ as bench
    commit = bench._commit()
    assert commit and commit != "None"
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(subprocess, "run", no_git)  # outside a clone, or no git at all
    built = fused_opt.build_info().get("commit")
    outside = bench._commit()
    assert outside.endswith("(as built)") if built else outside.startswith("unknown (")


def test_a_missing_plot_is_explained(monkeypatch, tmp_path, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    main(["--quick", "--repeats", "1", "--steps", "1", "--dtypes", "fp16", "--optimizers", "sgd", "--only", "64K",
          "--out", str(tmp_path)])
    assert "no plot: matplotlib is not installed" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
