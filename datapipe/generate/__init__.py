"""The embedded sample's generator: molecules and their GFN2-xTB labels (:mod:`datapipe.generate.molecules`),
the OMol25-layout ``.aselmdb`` writer, summary and command line (:mod:`datapipe.generate.writer`).

Run as ``python -m datapipe.generate --out DIR ...``; rdkit and tblite (``symscale[generate]``) are
imported only when a molecule is built.
"""
