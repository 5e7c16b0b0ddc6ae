"""torchtitan's own trainer (`Trainer`, its `llama3_debugmodel` config) on CPU ranks, with its
AdamW or ours. Write its tokenizer and corpus once, then run it under torchrun
(tests/test_torchtitan.py does both):

    python tests/torchtitan_cpu_trainer.py WORKDIR assets
    torchrun --nproc_per_node 2 tests/torchtitan_cpu_trainer.py WORKDIR {torch,ours,recipe} OUT.json
             [--steps N] [--save-every N] [--load-step N]

torchtitan targets accelerators; `cpu_shim()` is what running it on gloo CPU ranks takes, and
changes no math of the model, its data or the optimizers:

1. the device type is "cpu" (torchtitan picks "cuda" when no accelerator is found), with the
   few memory-monitor calls it makes on an accelerator module answered for the CPU;
2. FlexAttention (torchtitan's only attention for its language models; eager flex_attention
   refuses CPU tensors) becomes SDPA with the same mask, made from the BlockMask's `mask_mod`;
3. FSDP2's reduce-scatter uses SUM: torchtitan divides grads itself (by the global token
   count) and sets FSDP's divide factor to 1, which FSDP2 sends as PREMUL_SUM(1), an op gloo
   lacks; SUM is the same reduction;
4. `torch.distributed.set_timeout`, which torchtitan 0.3.0 calls after the first step, is
   skipped where this torch lacks it.

Data: `make_assets(WORKDIR)` writes a byte-level BPE tokenizer (HF `tokenizers`) and a small
JSON-lines text corpus, read by torchtitan's own tokenizer and HF-datasets loader.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import types

import torch

VOCAB = 512
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"]


def make_assets(workdir: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(f"{workdir}/tokenizer", exist_ok=True)
    os.makedirs(f"{workdir}/data", exist_ok=True)
    rng = random.Random(0)
    words = [w for w in """the a of to in is that optimizer step weights shard rank gradient norm scale loss
              master state moment decay update learning rate model layer token batch sequence clip
              checkpoint resume train sample memory bandwidth kernel fused mixed precision""".split()]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 160))) for _ in range(400)]
    with open(f"{workdir}/data/train.json", "w") as f:
        for line in lines:
            f.write(json.dumps({"text": line}) + "\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(f"{workdir}/tokenizer/tokenizer.json")
    with open(f"{workdir}/tokenizer/tokenizer_config.json", "w") as f:
        json.dump({"bos_token": SPECIAL[0], "eos_token": SPECIAL[1]}, f)


class _CPUModule:
    """torch.cpu, plus the accelerator-module calls torchtitan's memory monitor makes."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def get_device_name(self, device=None):
        return "cpu"

    def get_device_properties(self, device=None):
        return types.SimpleNamespace(name="cpu", total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def reset_peak_memory_stats(self, device=None):
        pass

    def empty_cache(self):
        pass

    def memory_stats(self, device=None):
        return {}

    def set_device(self, device):
        pass

    def current_device(self):
        return 0


def cpu_shim() -> None:
    """Call before anything imports torchtitan (it reads the device type at import)."""
    import torch._utils
    cpu = _CPUModule()
    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = lambda device_type=None: cpu

    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_mask
    from torchtitan.models.common.attention import FlexAttention

    def sdpa_with_the_block_mask(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux, kernel_options):
        assert score_mod is None and not return_aux.lse, "the shim covers mask-only attention"
        mask = create_mask(block_mask.mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa), None

    FlexAttention.compiled_flex_attn = staticmethod(sdpa_with_the_block_mask)

    import torchtitan.distributed.fsdp as titan_fsdp
    from torch.distributed.fsdp import FSDPModule
    disable_division = titan_fsdp.disable_fsdp_gradient_division

    def sum_without_division(model):
        disable_division(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    titan_fsdp.disable_fsdp_gradient_division = sum_without_division

    import torch.distributed as dist
    import torchtitan.distributed.utils as titan_dist_utils
    if not hasattr(dist, "set_timeout"):
        titan_dist_utils.set_pg_timeouts = lambda *args, **kwargs: None


def config_for(workdir: str, mode: str, steps: int, save_every: int, load_step: int):
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    config = llama3_debugmodel()
    config.model_spec.model.vocab_size = VOCAB
    config.model_spec.model.tok_embeddings.num_embeddings = VOCAB
    config.model_spec.model.lm_head.out_features = VOCAB
    config.loss.loss_fn.global_vocab_size = VOCAB
    config.hf_assets_path = f"{workdir}/tokenizer"
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path=f"{workdir}/data")
    config.training.seq_len, config.training.local_batch_size, config.training.steps = 128, 2, steps
    config.training.disable_cuda_graphs = True
    config.parallelism.spmd_backend = "partial_dtensor"
    config.validator.enable = False
    config.debug.seed = 0
    config.dump_folder = f"{workdir}/{mode}"
    config.checkpoint.enable = save_every > 0 or load_step > 0
    config.checkpoint.interval = max(save_every, 1)
    config.checkpoint.last_save_model_only = False
    config.checkpoint.load_step = load_step
    if mode in ("ours", "recipe"):
        from fused_opt.integrations.torchtitan import fused_adamw
        adamw = config.optimizer.param_groups[0].optimizer_kwargs  # torchtitan's default_adamw
        pipeline = {}
        if mode == "recipe":  # docs/recipes.md: BF16 shards, compact masters, int8 state, clip in the step
            config.training.dtype = "bfloat16"
            pipeline = dict(master_weights="remainder8", state_precision="int8", max_grad_norm=config.training.max_norm,
                            ema_decay=0.9)
            config.training.max_norm = 1e30
        config.optimizer = fused_adamw(lr=adamw["lr"], betas=adamw["betas"], eps=adamw["eps"],
                                       weight_decay=adamw["weight_decay"], **pipeline)
    return config


def digest(trainer) -> str:
    """This rank's model shards and optimizer state as the optimizer keeps it (int8 codes and
    their scales, masters, EMA, counts: not a state dict's decoded copy), hashed: equal
    digests, equal bits."""
    h = hashlib.sha256()
    opt = trainer.optimizers.optimizers[0]
    for model in trainer.model_parts:
        for name, p in sorted(model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().to_local().contiguous().view(torch.uint8).numpy().tobytes())
            for key, value in sorted(opt.state[p].items()):
                if isinstance(value, torch.Tensor):
                    value = getattr(value, "_local_tensor", value)
                    h.update(key.encode())
                    h.update(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("mode", choices=["assets", "torch", "ours", "recipe"])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--load-step", type=int, default=-1)
    args = parser.parse_args()
    if args.mode == "assets":
        make_assets(args.workdir)
        return
    if args.out is None:
        parser.error("OUT.json is needed to train")
    cpu_shim()
    import torch.distributed as dist

    trainer = config_for(args.workdir, args.mode, args.steps, args.save_every, args.load_step).build()
    losses = {}
    log = trainer.metrics_processor.log

    def record(step, loss, *rest, **kwargs):
        losses[step] = float(loss)
        return log(step, loss, *rest, **kwargs)

    trainer.metrics_processor.log = record
    trainer.train()
    opt = trainer.optimizers.optimizers[0]
    result = dict(kind=type(opt).__name__, losses=losses, digest=digest(trainer),
                  applied_steps=int(getattr(opt, "_applied_steps", -1)),
                  param_dtype=str(next(trainer.model_parts[0].parameters()).dtype))
    trainer.close()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, result["digest"])
    result["digest"] = digests
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
