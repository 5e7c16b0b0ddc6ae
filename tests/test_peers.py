"""Other libraries' optimizers in the benchmark and the quality runs (fused_opt/bench/peers.py).
`make test` installs the peers that install beside torch 2.13; FlashOptim and Transformer
Engine need CUDA, and must say so instead of running."""
import dataclasses
import json
import math

import pytest
import torch

from fused_opt.bench import peers, quality
from fused_opt.bench.__main__ import equal_bytes, main
from fused_opt.bench.contenders import Model, _mode_label

CPU = torch.device("cpu")


def test_held_bytes_counts_each_storage_once_through_nested_state():
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16)) for _ in range(3)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt.step()
    assert peers.held_bytes(params, opt.state.values()) == 4.0  # BF16 params + BF16 momentum
    flat = torch.zeros(128, dtype=torch.bfloat16)  # views of one storage, and state nested in lists and dicts
    assert peers.held_bytes([flat[:64], flat[64:]], [{"a": [flat[:10]], "b": {"c": flat[5:]}}]) == 2.0


def test_torchao_8bit_state_is_measured_from_its_codes_and_block_scales():
    torchao_optim = pytest.importorskip("torchao.optim")
    p = torch.nn.Parameter(torch.randn(4096, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = torchao_optim.AdamW8bit([p], lr=1e-3)
    opt.step()
    # BF16 param; exp_avg and exp_avg_sq as uint8 codes with an FP32 scale per 256 (+ a 256-entry map each),
    # and the FP32 step count (the state reports dtype bfloat16, 2 bytes per element: not its storage)
    assert peers.held_bytes([p], opt.state.values()) == pytest.approx(2 + 2 * (1 + 4 / 256 + 256 * 4 / 4096) + 4 / 4096)


@pytest.mark.parametrize("peer", peers.PEERS, ids=[p.name for p in peers.PEERS])
def test_each_peer_steps_its_own_bf16_params_or_says_why_it_cannot(peer):
    model = Model([(7,), (33, 5)], torch.bfloat16, CPU)
    reason = peers.why_not(peer, CPU)
    if peer.cuda_only:
        assert reason is not None and "CUDA" in reason, reason
        return
    if reason is not None and reason.startswith("not installed"):  # make test installs them; a bare GPU machine may not
        pytest.skip(reason)
    assert reason is None, reason
    contender = peers.PeerContender(model, peer)
    with torch.no_grad():  # small weights, so that a step of lr * 1e-3 shows in BF16 (Kahan peers keep it aside otherwise)
        for p in contender.params:
            p.mul_(1e-4)
    before = [p.detach().clone() for p in contender.params]
    for _ in range(2):  # HeavyBall frees the grads it steps: the contender hands them back
        contender.step()
    for p, b in zip(contender.params, before):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert not torch.equal(p, b), f"{peer.name} left a param unchanged"
    assert all(torch.equal(g.float(), (s.float() / model.scale).bfloat16().float())
               for g, s in zip(model.unscaled_grads(), model.grads))  # the shared grads: left as they were (optimi
    # writes the weight decay into the grads it steps, its own copy)
    assert contender.memory_per_param() > 2.0  # its params and some state
    ours = peers.paired_ours(model, peer)
    assert ours.name == "fused_opt[native]" + _mode_label(*peer.ours)


def test_a_peer_not_installed_is_listed_with_why(monkeypatch):
    real = peers.version
    monkeypatch.setattr(peers, "version", lambda package: None if package == "torch-optimi" else real(package))
    optimi_sgd = next(p for p in peers.PEERS if p.package == "torch-optimi" and p.optimizer == "sgd")
    assert peers.why_not(optimi_sgd, CPU) == "not installed (pip install torch-optimi)"
    heavyball = next(p for p in peers.PEERS if p.package == "heavyball")
    assert "compiles" in peers.why_not(heavyball, CPU, tensors=161)


def test_peers_only_benchmark_pairs_each_peer_with_ours(tmp_path, monkeypatch):
    real = peers.version
    monkeypatch.setattr(peers, "version", lambda package: None if package == "bitsandbytes" else real(package))
    main(["--quick", "--peers-only", "--optimizers", "sgd", "--only", "64K", "--repeats", "2", "--steps", "1",
          "--out", str(tmp_path)])
    record = json.loads((tmp_path / "peers-cpu-64K.json").read_text())
    rows = {r["contender"]: r for r in record["peers"]}
    assert set(rows) == {p.name for p in peers.PEERS if p.optimizer == "sgd"}
    assert rows["bitsandbytes SGD8bit"]["skipped"] == "not installed (pip install bitsandbytes)"
    assert "CUDA" in rows["FlashOptim FlashSGD"]["skipped"]
    optimi = rows["optimi SGD (Kahan)"]
    assert optimi["ours"] == "fused_opt[native] remainder8 bf16 state" and optimi["version"] == real("torch-optimi")
    assert optimi["held"] == pytest.approx(6.0) and optimi["ours_held"] == pytest.approx(5.0, abs=0.1)
    assert optimi["ours_faster"] > 0 and optimi["time_ms"] > 0 and optimi["ours_ms"] > 0
    assert optimi["host_ops"] > optimi["ours_host_ops"]  # a foreach step per op against one native call
    text = (tmp_path / "peers-cpu-64K.md").read_text()
    assert "| sgd | sweep 64K |" in text and "skipped: not installed" in text and record["rows"] == []


def test_default_benchmark_has_a_peer_row_per_optimizer(tmp_path):
    main(["--quick", "--repeats", "1", "--steps", "1", "--dtypes", "bf16", "--only", "64K", "--no-fsdp2",
          "--out", str(tmp_path)])
    record = json.loads((tmp_path / "bench-cpu-64K.json").read_text())
    ran = [r for r in record["peers"] if not r.get("skipped")]
    assert {r["optimizer"] for r in ran} == {"sgd", "adamw"}
    assert {r["contender"] for r in ran} == {p.name for p in peers.PEERS if p.default}
    text = (tmp_path / "bench-cpu-64K.md").read_text()
    assert "Peers (BF16 params" in text
    # our default SGD row (10 B/param) beside optimi's (6): the fastest peer at as few bytes or fewer
    [sgd] = [e for e in equal_bytes(record) if e["ours"] == "fused_opt[native]" and e["optimizer"] == "sgd"]
    assert sgd["peer"] == "optimi SGD (Kahan)" and sgd["peer_held"] <= sgd["ours_held"]
    assert sgd["ours_faster"] == pytest.approx(sgd["peer_ms"] / sgd["ours_ms"]) and "fastest peer at <= bytes" in text


def test_quality_trains_the_peers_beside_our_formats(tmp_path):
    quality.main(["--steps", "12", "--tasks", "cnn", "--masters", "fp32", "--states", "fp32", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "quality-cpu.json").read_text())
    names = [r["master"] for r in record["runs"]]
    expected = [p for p in peers.PEERS if p.optimizer == "sgd" and peers.why_not(p, CPU) is None]
    assert [n for n in names if n.startswith("peer:")] == [f"peer: {p.name} {peers.version(p.package)}"
                                                            for p in expected]
    for r in record["runs"]:
        assert len(r["losses"]) == 12 and all(math.isfinite(x) for x in r["losses"]) and r["bytes_per_param"] >= 2.0
    assert "peer: optimi SGD (Kahan)" in (tmp_path / "quality-cpu.md").read_text()


def test_a_peer_that_fails_here_is_listed_with_its_error(tmp_path, monkeypatch):
    optimi_sgd = next(p for p in peers.PEERS if p.package == "torch-optimi" and p.optimizer == "sgd")

    def broken(params, **hyper):
        raise RuntimeError("built for another torch\nsecond line")
    monkeypatch.setattr(peers, "PEERS", (dataclasses.replace(optimi_sgd, make=broken),))
    main(["--quick", "--peers-only", "--optimizers", "sgd", "--only", "64K", "--repeats", "1", "--steps", "1",
          "--out", str(tmp_path)])
    [row] = json.loads((tmp_path / "peers-cpu-64K.json").read_text())["peers"]
    assert row["skipped"] == "failed here: RuntimeError: built for another torch"


def test_quality_gives_the_peers_torchs_betas_where_a_task_names_none(tmp_path, monkeypatch):
    optimi_adamw = next(p for p in peers.PEERS if p.package == "torch-optimi" and p.optimizer == "adamw")
    seen = []

    def spy(params, **hyper):
        seen.append(hyper)
        return optimi_adamw.make(params, **hyper)
    monkeypatch.setattr(peers, "PEERS", (dataclasses.replace(optimi_adamw, make=spy),))
    quality.main(["--steps", "3", "--tasks", "embed", "gpt", "--masters", "fp32", "--states", "fp32",
                  "--out", str(tmp_path)])
    # optimi's own default beta2 is 0.99: the embedding task names none, so torch's (0.999) is passed
    assert [h["betas"] for h in seen] == [(0.9, 0.999), (0.9, 0.95)]
