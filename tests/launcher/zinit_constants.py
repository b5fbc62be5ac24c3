"""Build each zoo model inside DeepSpeed's ``zero.Init`` with bf16 (as ``--zero-stage 3 --precision bf16``
does) and compare every constant of the fp32 islands (``DeviceCache`` tensors, buffers) with a plain
build: ``zero.Init`` re-types the outputs of ``torch.zeros/arange/tensor/…`` to bf16 while a model is
built, which once broke eSEN's construction and would round the islands' constants. Prints
``all constants identical`` or the differences (run by tests/launcher/test_bf16_training.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launcher.engine import init_distributed

init_distributed(engine="deepspeed")

import deepspeed
import torch

from zoo.registry import build


def constants(model):
    out = {}
    for module_name, module in model.named_modules():
        for key, value in vars(module).items():
            if type(value).__name__ == "DeviceCache":
                out.update({f"{module_name}.{key}.{k}": t for k, t in value._cpu.items()})
        out.update({f"{module_name}.{k}": b for k, b in module.named_buffers(recurse=False)})
    return out


config = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1}
bad = []
for name in ("esen", "mpnn", "mc-egnn"):  # GemNet-OC (a pre-training hook) is never built inside zero.Init
    plain = build(name, width=8)
    with deepspeed.zero.Init(config_dict_or_path=config):
        inside = build(name, width=8)
    assert next(inside.parameters()).dtype == torch.bfloat16  # zero.Init did apply bf16
    a, b = constants(plain), constants(inside)
    assert a.keys() == b.keys() and a, name
    bad += [f"{name}: {k} {a[k].dtype} -> {b[k].dtype}" for k in a
            if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k].to(a[k].dtype))]
print("\n".join(bad) or "all constants identical")
