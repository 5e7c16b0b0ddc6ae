"""GPU-only checks (run where a GPU is present): CUDA-graph capture of step() and tensors
past 2^31 elements. The rest of the suite also runs on CUDA tensors there."""
import copy

import pytest
import torch

import fused_opt
from harness import BACKEND_DEVICES, assert_close_fp32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cuda"]


def make(backend, lr, optimizer="sgd"):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen).half()) for n in (7, 4097, 70000)]
    scale = dict(max_grad_norm=1.0, init_scale=2.0**10, growth_interval=3, backend=backend)
    if optimizer == "adamw":
        return params, fused_opt.FusedMixedPrecisionAdamW(params, lr=lr, weight_decay=1e-2, **scale)
    return params, fused_opt.FusedMixedPrecisionSGD(params, lr=lr, momentum=0.9, weight_decay=1e-4, **scale)


def grads_at(step, params):
    gen = torch.Generator(device="cuda").manual_seed(100 + step)
    grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in params]
    if step == 4:
        grads[1][5] = float("inf")
    return grads


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_step_replays_in_a_cuda_graph(backend, optimizer):
    lr = torch.tensor(0.05, device="cuda")
    params, opt = make(backend, lr, optimizer)
    ref_params, ref = make("torch", 0.05, optimizer)
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    loss = torch.zeros((), device="cuda")

    def feed(step, scale_from):
        for g, q, x in zip(static_grads, ref_params, grads_at(step, params)):
            scaled = (x * 1e-2 * scale_from).half()
            g.copy_(scaled)
            q.grad = scaled.clone()

    # warm up eagerly (state, tables, compilation) in lockstep with the reference
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(2):
            feed(step, float(opt.loss_scale))
            opt.scale_loss(loss)
            opt.step()
            ref.scale_loss(loss)
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.scale_loss(loss)
        opt.step()
    for step in range(2, 10):
        if step == 6:
            lr.fill_(0.02)  # a device-tensor lr may change under replay
            ref.param_groups[0]["lr"] = 0.02
        feed(step, float(opt.loss_scale))
        graph.replay()
        ref.scale_loss(loss)
        ref.step()
        torch.cuda.synchronize()
        assert bool(opt.last_step_skipped) == bool(ref.last_step_skipped) == (step == 4)
        assert float(opt.loss_scale) == float(ref.loss_scale)
        for p, q in zip(params, ref_params):
            assert_close_fp32(opt.state[p]["master_param"], ref.state[q]["master_param"], f"step {step}")


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_tensor_past_2_pow_31_elements(backend):
    n = 2**31 + 4096 + 3
    if torch.cuda.mem_get_info()[0] < n * 24:
        pytest.skip("not enough GPU memory for a >2^31-element tensor")
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float16, device="cuda"))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=1.0, momentum=0.5, loss_scale=None, backend=backend)
    p.grad = torch.zeros_like(p)
    p.grad[-3:] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    p.grad[:2] = 0.5
    opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p[-3:].float().cpu(), torch.tensor([-1.0, -2.0, -3.0]))
    assert torch.equal(p[:2].float().cpu(), torch.tensor([-0.5, -0.5]))
    assert float(p.detach()[2**31 - 5: 2**31 + 5].float().abs().sum()) == 0.0
    torch.testing.assert_close(float(opt.last_grad_norm), (14 + 0.5) ** 0.5, rtol=1e-5, atol=0)


def run(params, opt, steps):
    for step in steps:
        for p, g in zip(params, grads_at(step, [p.cuda() for p in params])):
            p.grad = (g * float(opt.loss_scale)).to(p.device, p.dtype)
        opt.scale_loss(torch.zeros((), device=params[0].device))
        opt.step()


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("direction", ["cuda->cpu", "cpu->cuda"])
def test_state_dict_moves_between_gpu_and_cpu(backend, direction):
    """A checkpoint saved on one device loads on the other: FP32 masters and buffers stay
    FP32 and land on the params' device, and the run continues as it would have."""
    source, target = direction.split("->")
    params, opt = make(backend, 0.05)
    params = [torch.nn.Parameter(p.detach().to(source)) for p in params]
    opt = fused_opt.FusedMixedPrecisionSGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4, max_grad_norm=1.0,
                                           init_scale=2.0**10, growth_interval=3,
                                           backend=backend if source == "cuda" else "auto")
    run(params, opt, range(5))
    saved_params, saved = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    run(params, opt, range(5, 8))

    moved = [torch.nn.Parameter(p.to(target)) for p in saved_params]
    opt2 = fused_opt.FusedMixedPrecisionSGD(moved, lr=0.05, momentum=0.9, weight_decay=1e-4, max_grad_norm=1.0,
                                            init_scale=2.0**10, growth_interval=3,
                                            backend=backend if target == "cuda" else "auto")
    opt2.load_state_dict(saved)
    for p in moved:
        for key in ("master_param", "momentum_buffer"):
            assert opt2.state[p][key].device == p.device and opt2.state[p][key].dtype == torch.float32
    assert opt2.loss_scale.device == moved[0].device and float(opt2.loss_scale) == float(saved["param_groups"][0]["fused_opt"]["loss_scaler"]["scale"])
    run(moved, opt2, range(5, 8))
    for p, q in zip(params, moved):
        assert_close_fp32(opt2.state[q]["master_param"].cpu(), opt.state[p]["master_param"].cpu().double(),
                          f"{direction} master")
    assert float(opt.loss_scale) == float(opt2.loss_scale)
