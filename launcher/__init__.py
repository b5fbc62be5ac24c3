"""The training job: ``launcher/train.py`` (entry) → :mod:`launcher.loop` (the recipe, one page).

Modules: :mod:`~launcher.config` (flags, defaults, DeepSpeed JSON), :mod:`~launcher.job` (setting a
run up: ranks, shards, model, pre-training hook, engine, counters), :mod:`~launcher.engine`
(processes, devices, DeepSpeed), :mod:`~launcher.data` (shards), :mod:`~launcher.loss` (global
loss), :mod:`~launcher.optim` (schedule-free AdamW and its averaged weights),
:mod:`~launcher.validate`, :mod:`~launcher.checkpoint` (resume), :mod:`~launcher.progress`,
:mod:`~launcher.throughput` (FLOP/s, MFU, κ). What differs between architectures comes from
:mod:`zoo.registry`; the launcher names none of them.
"""
