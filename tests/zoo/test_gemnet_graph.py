"""GemNet-OC's quadruplet join (:func:`zoo.models.gemnet_oc.graph.quadruplets`): the direct
construction (one binary search per trip_out for the dropped ``d = c`` element, the pairs written by a
cumulative sum) against the general join (all pairs on each qint edge, then ``d ≠ c`` kept), exactly
and in the same order, on batches of several structures, graphs without quadruplets and a main graph
with a repeated atom pair (where the direct construction steps aside).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.models.gemnet_oc import graph as G


def structures(seed: int, sizes=(9, 5, 1, 12), box=4.0):
    """Positions ``[N, 3]`` and structure index ``[N]`` of a batch (an isolated atom included)."""
    rng = np.random.default_rng(seed)
    pos = torch.as_tensor(np.concatenate([rng.uniform(0, box, (n, 3)) for n in sizes]), dtype=torch.float64)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return pos, batch


def both_joins(main: G.Graph, qint: G.Graph, n: int):
    quad = G.quadruplets(main, qint, n)
    general = G._join_quadruplets_general(quad["trip_in"], quad["trip_out"], main.source, qint.num_edges)
    return quad, general


@pytest.mark.parametrize("seed, main_cut, q_cut, q_limit", [(0, 2.5, 3.0, 3), (1, 3.0, 3.5, None),
                                                            (2, 2.0, 4.0, 5), (3, 1.0, 1.2, 2)])
def test_direct_quadruplet_join_equals_general_join(seed, main_cut, q_cut, q_limit):
    pos, batch = structures(seed)
    n = pos.shape[0]
    main = G.build_radius_graph(pos, batch, main_cut)
    qint = G.subgraph(G.build_radius_graph(pos, batch, q_cut), q_cut, q_limit, n)
    quad, (quad_in, quad_out) = both_joins(main, qint, n)
    assert torch.equal(quad["quad_in"], quad_in) and torch.equal(quad["quad_out"], quad_out)
    assert quad["quad_in"].dtype == quad["quad_out"].dtype == torch.long
    if seed < 3:
        assert quad_in.numel() > 100
    # grouped by trip_out, trip_in rising within each group
    key = quad["quad_out"] * (quad["trip_in"]["in"].numel() + 1) + quad["quad_in"]
    assert bool((key[1:] > key[:-1]).all())


def test_no_quadruplets():
    pos, batch = structures(4, sizes=(3, 2))
    n = pos.shape[0]
    main = G.build_radius_graph(pos, batch, 0.1)  # no edges at all
    quad, _ = both_joins(main, main, n)
    assert quad["quad_in"].numel() == quad["quad_out"].numel() == 0
    main = G.build_radius_graph(pos, batch, 10.0)  # triangles only: every d is c
    quad, (quad_in, _) = both_joins(main, main, n)
    assert quad["quad_in"].numel() == quad_in.numel() == 0
    assert quad["trip_in"]["in"].numel() > 0


def test_repeated_atom_pair_takes_the_general_join():
    """A main graph listing one pair twice (d no longer rises along a qint edge's trip_in): the same
    quadruplets as the general join, both copies of the repeated edge in them."""
    pos, batch = structures(5, sizes=(8,))
    n = pos.shape[0]
    main = G.build_radius_graph(pos, batch, 3.0)
    twice = torch.cat([main.edge_index, main.edge_index[:, :1], main.edge_index[:, :1].flip(0)], dim=1)
    main2 = G.graph_from_edges(pos, twice)
    qint = G.subgraph(G.build_radius_graph(pos, batch, 3.5), 3.5, 4, n)
    quad, (quad_in, quad_out) = both_joins(main2, qint, n)
    assert torch.equal(quad["quad_in"], quad_in) and torch.equal(quad["quad_out"], quad_out)
    assert quad_in.numel() > G.quadruplets(main, qint, n)["quad_in"].numel()
