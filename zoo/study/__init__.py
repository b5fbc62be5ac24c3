"""The mini scaling study: ``zoo study --preset quick|cpu|paper`` (see :mod:`zoo.study.cli`).

Rooms: :mod:`~zoo.study.presets` (what to train), :mod:`~zoo.study.plan` (runs, shared data,
the nested data ladder), :mod:`~zoo.study.estimate` (dry-run cost), :mod:`~zoo.study.runner`
(scheduling, skip/resume, live table), :mod:`~zoo.study.collect` (``runs.csv``),
:mod:`~zoo.study.report` (fits and ``report.md``). It sits above the launcher: runs are
subprocesses of ``launcher/train.py``.
"""
