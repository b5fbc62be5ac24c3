"""The training job: ``launcher/train.py`` (entry) → :mod:`launcher.loop` (the recipe).

Modules: :mod:`~launcher.config` (flags, defaults, DeepSpeed JSON), :mod:`~launcher.engine`
(processes, devices, DeepSpeed), :mod:`~launcher.data` (shards), :mod:`~launcher.loss` (global
loss), :mod:`~launcher.optim` (schedule-free AdamW and its averaged weights),
:mod:`~launcher.validate`, :mod:`~launcher.checkpoint` (resume), :mod:`~launcher.progress`,
:mod:`~launcher.throughput` (FLOP/s, MFU, κ), :mod:`~launcher.scales` (GemNet-OC's fitted scale factors).
"""
