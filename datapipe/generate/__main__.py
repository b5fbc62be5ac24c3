"""``python -m datapipe.generate``: build the embedded OMol25-format sample (see :mod:`datapipe.generate.molecules`)."""

from datapipe.generate.writer import main

main()
