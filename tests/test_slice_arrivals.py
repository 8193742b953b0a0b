"""A model of rung 8's slice-end protocol (csrc/s8_hopper.cu, above peek_count_if), run over
random interleavings of the blocks that share a slice.

Each contributor's part of the slice is, in its run, either the final segment (the slice's
first block always; middle blocks, whose whole run lies in the slice; the last block when its
run ends there) or a first segment that the run goes on from (the last block otherwise):

* final:    look at the counter; store the partials; if contributors - 1 others were in at the
            look, write the slice (reset the counter) without counting; else count in with an
            atomic and write the slice if it found contributors - 1.
* deferred: store the partials; count in with an atomic; go on; at the end of the run, write
            the slice if the atomic found contributors - 1.

Whatever the order of the steps, exactly one block must write the slice, every partial must be
stored by then, and the counter must end at zero with no arrival after its reset. Each step here
is atomic; the memory ordering that makes it so on the GPU (releases, the acquire fence) is argued
in the kernel's comment. A relaxed look that returns a stale count is a look taken earlier, which
the interleavings cover.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st


def final_segment(block: int, contributors: int):
    """The steps of a block whose part of the slice is its run's final segment."""
    seen = yield ("peek", block)
    yield ("store", block)
    if seen == contributors - 1:
        yield ("write", block)
        return
    found = yield ("count", block)
    if found == contributors - 1:
        yield ("write", block)


def deferred_segment(block: int, contributors: int):
    """The steps of a block whose part of the slice is its run's first segment, not its last."""
    yield ("store", block)
    found = yield ("count", block)
    yield ("rest of the run", block)
    if found == contributors - 1:
        yield ("write", block)


def run_protocol(contributors: int, deferred: set[int], order: list[int]) -> tuple[list[int], int]:
    """Advance the blocks one step at a time in the order `order` picks (indices into the blocks
    still running, taken modulo their number) until all are done; returns (writers, counter)."""
    counter, stored, writers, counting_after_reset, reset = 0, set(), [], False, False
    segment = {b: deferred_segment if b in deferred else final_segment for b in range(contributors)}
    blocks = {b: segment[b](b, contributors) for b in range(contributors)}
    replies: dict[int, object] = {b: None for b in blocks}
    picks = iter(order)
    while blocks:
        running = sorted(blocks)
        b = running[next(picks, 0) % len(running)]
        try:
            step = blocks[b].send(replies[b])
        except StopIteration:
            del blocks[b]
            continue
        kind = step[0]
        replies[b] = None
        if kind == "peek":
            replies[b] = counter
        elif kind == "store":
            stored.add(b)
        elif kind == "count":
            counting_after_reset |= reset
            replies[b] = counter
            counter += 1
        elif kind == "write":
            assert stored == set(range(contributors)), f"block {b} writes before every partial is stored"
            writers.append(b)
            counter, reset = 0, True
    assert not counting_after_reset, "a block counted in after the counter was reset"
    return writers, counter


@st.composite
def slices(draw):
    contributors = draw(st.integers(2, 8))
    # Block 0 (the slice's top) always ends its run here; the bottom block may go on.
    last_defers = draw(st.booleans())
    deferred = {contributors - 1} if last_defers else set()
    order = draw(st.lists(st.integers(0, 7), max_size=80))
    return contributors, deferred, order


@given(slices())
def test_exactly_one_block_writes_each_slice_and_the_counter_ends_at_zero(case):
    contributors, deferred, order = case
    writers, counter = run_protocol(contributors, deferred, order)
    assert len(writers) == 1 and counter == 0


def test_both_shortcuts_are_taken_in_some_order():
    """The fast path (no count) and the deferred writer each happen in some interleaving."""
    # Block 1 (deferred) runs to the end of its run first; block 0 looks and finds it in.
    writers, _ = run_protocol(2, {1}, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    assert writers == [0]
    # Block 0 counts in first; block 1's deferred count then finds it and block 1 writes.
    writers, _ = run_protocol(2, {1}, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert writers == [1]
