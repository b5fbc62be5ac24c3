"""Checking a structure's total charge and spin multiplicity: one rule wherever they enter.

OMol25 labels every structure with a total charge ``q`` (e) and a spin multiplicity ``2S+1``
(:mod:`datapipe.keys`). Both are integers, and they must agree with the electron count
``n_e = Σ Z − q``: ``2S = n_unpaired`` has the parity of ``n_e`` (an even electron count gives an
odd multiplicity — singlet, triplet, … — and an odd count an even one — doublet, quartet, …),
and at most ``n_e`` electrons can be unpaired (``2S + 1 ≤ n_e + 1``). A value that breaks this
is a labelling error; rounding it or embedding it anyway would give a silently wrong energy.

The converter (:func:`datapipe.sources.check`), the loader (records read back from shards) and
the ASE calculator (via :func:`datapipe.graph.batch_from_atoms`) all call :func:`checked`.

>>> checked([8, 1, 1], 0, 1, "water")
(0, 1)
>>> checked([8, 1, 1], 1, 2, "water cation")
(1, 2)
>>> checked([8, 1, 1], 0, 2, "water")
Traceback (most recent call last):
...
ValueError: structure 'water': spin multiplicity 2 does not match 10 electrons (Σ Z = 10, charge 0): an even electron count needs an odd multiplicity
>>> checked([8, 1, 1], 0.5, 1, "water")
Traceback (most recent call last):
...
ValueError: structure 'water': charge 0.5 is not an integer (charge in e and multiplicity 2S+1 must be integers; never rounded)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from datapipe.keys import MAX_ATOMIC_NUMBER


def _integer(value, what: str, name: str) -> int:
    """``value`` as an int if it is an integer number (``2``, ``2.0``, ``numpy.int64(2)``), else ValueError."""
    value = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value  # numpy scalars
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:  # numpy 0-d arrays, strings of numbers from extended XYZ comments
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"structure {name!r}: {what} {value!r} is not a number") from None
    if not math.isfinite(float(value)) or float(value) != int(value):
        raise ValueError(f"structure {name!r}: {what} {value!r} is not an integer (charge in e and multiplicity "
                         "2S+1 must be integers; never rounded)")
    return int(value)


def problem(atomic_numbers: Sequence[int], charge: int, spin: int) -> str | None:
    """What is wrong with integer ``charge`` (e) and multiplicity ``spin`` for these elements, or None.

    The electron-count rules are checked only when every Z is a known element (1..
    :data:`datapipe.keys.MAX_ATOMIC_NUMBER`): otherwise the count is undefined, and the element
    check (converter, model) reports the element instead.
    """
    if spin < 1:
        return f"spin multiplicity {spin} < 1 (multiplicity is 2S+1)"
    zs = [int(z) for z in atomic_numbers]
    if any(z < 1 or z > MAX_ATOMIC_NUMBER for z in zs):
        return None
    total = sum(zs)
    electrons = total - charge
    if electrons < 0:
        return f"charge {charge} leaves {electrons} electrons (Σ Z = {total})"
    if (electrons + spin) % 2 == 0:
        need = "an odd" if electrons % 2 == 0 else "an even"
        parity = "even" if electrons % 2 == 0 else "odd"
        return (f"spin multiplicity {spin} does not match {electrons} electrons (Σ Z = {total}, charge {charge}): "
                f"an {parity} electron count needs {need} multiplicity")
    if spin - 1 > electrons:
        return f"spin multiplicity {spin} needs {spin - 1} unpaired electrons, only {electrons} present"
    return None


def checked(atomic_numbers: Sequence[int], charge, spin, name: str) -> tuple[int, int]:
    """``(charge, spin)`` as ints after checking them (see the module docstring).

    Parameters
    ----------
    atomic_numbers : ``[n]`` atomic numbers Z of the structure.
    charge : total charge, e (an integer number; ``1.0`` is accepted, ``0.5`` is not).
    spin : spin multiplicity 2S+1 (an integer number ≥ 1).
    name : the structure's id, for the error message.

    Raises
    ------
    ValueError
        naming the structure, if either is not an integer or they contradict the electron count.
    """
    charge, spin = _integer(charge, "charge", name), _integer(spin, "spin multiplicity", name)
    message = problem(atomic_numbers, charge, spin)
    if message is not None:
        raise ValueError(f"structure {name!r}: {message}")
    return charge, spin
