"""Peak FLOP/s of common accelerators and model FLOPs utilisation (MFU).

Dense peaks (no 2:4 sparsity), FMA = 2 FLOPs, as printed in the vendors' datasheets:

======================  =========  =========  =========  ============================================
device                  fp32 TF/s  tf32 TF/s  bf16 TF/s  source
======================  =========  =========  =========  ============================================
NVIDIA V100 SXM2        15.7       —          125 (fp16) NVIDIA Tesla V100 datasheet (no bf16; fp16 TC)
NVIDIA V100 PCIe        14         —          112 (fp16) NVIDIA Tesla V100 datasheet
NVIDIA A100 (SXM/PCIe)  19.5       156        312        NVIDIA A100 datasheet (sparse figures halved)
NVIDIA A10              31.2       62.5       125        NVIDIA A10 datasheet
NVIDIA L4               30.3       60         121        NVIDIA L4 datasheet
NVIDIA L40S             91.6       183        362        NVIDIA L40S datasheet
NVIDIA H100 SXM         67         495        989        NVIDIA H100 datasheet (sparse figures halved)
NVIDIA H100 PCIe        51         378        756        NVIDIA H100 datasheet
NVIDIA H100 NVL         60         418        835        NVIDIA H100 datasheet
NVIDIA H200 (SXM)       67         495        989        NVIDIA H200 datasheet (same GH100 compute)
NVIDIA GH200            67         495        989        NVIDIA GH200 datasheet
AMD MI250X              47.9       —          383        AMD Instinct MI250X datasheet
AMD MI300X              163.4      653.7      1307       AMD Instinct MI300X datasheet
======================  =========  =========  =========  ============================================

PyTorch runs fp32 matmuls on CUDA without TF32 unless ``torch.backends.cuda.matmul.allow_tf32``
(or ``torch.set_float32_matmul_precision("high")``) is set; :func:`peak_flops` then uses the tf32
column. For a CPU there is no datasheet figure that holds on a shared machine (clock, turbo and
SIMD units vary), and a wall-clock measurement taken while other processes load the machine is
too low, so MFU came out above 100 %. :func:`measure_peak` therefore measures a CPU per *CPU
second*: the FLOPs of a large fp32 matmul (current thread count, best of a few) over the CPU time
the process spent on it — FLOP per core-second. The launcher divides the training FLOPs by the CPU
time of the training processes times that figure (:mod:`launcher.throughput`). Load from other
processes takes cores away from both alike, so it cannot push MFU up; it stays below 100 % unless
the model's kernels beat a large matmul per cycle. On CUDA devices MFU is against wall time.
"""

from __future__ import annotations

import functools
import time

import torch

#: name fragment (lower case, matched against ``torch.cuda.get_device_name()``) → {dtype: FLOP/s}.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "v100-sxm2": {"fp32": 15.7e12, "fp16": 125e12},
    "v100-pcie": {"fp32": 14e12, "fp16": 112e12},
    "v100": {"fp32": 15.7e12, "fp16": 125e12},
    "a100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "a10g": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    "a10": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    "l40s": {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362e12, "fp16": 362e12},
    "l4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12},
    "h100 pcie": {"fp32": 51e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12},
    "h100 nvl": {"fp32": 60e12, "tf32": 418e12, "bf16": 835e12, "fp16": 835e12},
    "h100": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
    "h200": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
    "gh200": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
    "mi250x": {"fp32": 47.9e12, "bf16": 383e12, "fp16": 383e12},
    "mi300x": {"fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307e12, "fp16": 1307e12},
}

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def lookup_peak(device_name: str, dtype: str) -> float | None:
    """Datasheet dense peak (FLOP/s) of ``device_name`` for ``dtype`` (``fp32``/``tf32``/``bf16``/``fp16``).

    The longest matching name fragment wins (``"NVIDIA H100 PCIe"`` → ``h100 pcie``). Returns
    None for an unknown device or a dtype the device has no figure for.
    """
    name = device_name.lower()
    for fragment in sorted(PEAK_FLOPS, key=len, reverse=True):
        if fragment in name or fragment.replace("-", " ") in name:
            return PEAK_FLOPS[fragment].get(dtype)
    return None


@functools.lru_cache(maxsize=None)
def measure_peak(device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """Achieved rate of a ``size``² fp32 matmul on ``device`` (best of ``repeats``); cached.

    On a CUDA device FLOP per second of wall time; on the CPU FLOP per second of the process's CPU
    time (all its threads: FLOP per core-second), which other processes' load does not lower. On
    the CPU the faster of the two libraries the models' products run in: the BLAS behind ``a @ b``
    and oneDNN (:func:`zoo.models.dense.linear`, where it is switched on). On an AMD CPU the PyPI
    wheels' MKL runs AVX2 code and oneDNN AVX-512, about twice the rate (docs/zoo.md); a peak from
    the BLAS alone would let eSEN's and GemNet-OC's MFU pass 1.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    products = [lambda: a @ b]
    if device == "cpu":
        from zoo.models.dense import linear, takes_onednn

        if takes_onednn(a, b):
            products.append(lambda: linear(a, b))  # a @ bᵀ: the same 2·size³ FLOPs
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    best = float("inf")
    for product in products:
        for _ in range(repeats + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = clock()
            product()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, clock() - start)
    return 2.0 * size**3 / max(best, 1e-9)


def peak_flops(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """Peak FLOP/s for training in ``dtype`` on ``device`` and where the figure comes from.

    Returns ``(flops_per_second, source)`` with source ``"datasheet: <name> <dtype>"``,
    ``"measured: fp32 matmul on <device>"`` (unknown accelerators, per second of wall time) or, on
    a CPU, ``"measured: fp32 … matmul per CPU-second …"`` (FLOP per second of CPU time, see the
    module docstring).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = _DTYPES.get(dtype, "fp32")
        if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            key = "tf32"
        peak = lookup_peak(name, key)
        if peak is not None:
            return peak, f"datasheet: {name} {key} dense"
        return measure_peak(str(device)), f"measured: fp32 matmul on {name} (not in the table)"
    return measure_peak("cpu"), (f"measured: fp32 {2048}² matmul per CPU-second, {torch.get_num_threads()} thread(s), "
                                 f"{'the faster of the BLAS and oneDNN' if torch.backends.mkldnn.enabled else 'the BLAS'}")


def mfu(achieved_flops_per_second: float, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32) -> float:
    """Model FLOPs utilisation: achieved rate (FMA = 2) over :func:`peak_flops` of the device.

    On a CPU the rate is FLOP per CPU-second of the process (see the module docstring).
    """
    peak, _ = peak_flops(device, dtype)
    return achieved_flops_per_second / peak
