"""Hypothesis strategies shared by the property tests."""

from hypothesis import strategies as st


@st.composite
def placements(draw, world: int, pages: int):
    """(placement, num_devices): round robin over a random number of ranks, or a random
    explicit list where each page has 1..world owners in random order (a tuple mirrors)."""
    if draw(st.booleans()):
        return "round_robin", draw(st.sampled_from([-1, *range(1, world + 1)]))
    entries = []
    for _ in range(pages):
        ranks = tuple(draw(st.permutations(range(world)))[: draw(st.integers(1, world))])
        entries.append(ranks[0] if len(ranks) == 1 and draw(st.booleans()) else ranks)
    return entries, -1
