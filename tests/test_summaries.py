"""What policies score, through the components' public seams: the ``SummaryIndex`` (stacks per
sequence and layer: growth, in-place updates, mass sync, drop, clone, summaries for a writer)
and the ``Calibrator`` (sketch bases: fit, background store, adopting another's, forget)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from tierstore.calibrator import Calibrator
from tierstore.tiers.cold import ColdStore
from tierstore.layout import KVLayout
from tierstore.records import BlockSummary
from tierstore.sketch import CALIB_TOKENS, basis_key
from tierstore.summaries import SummaryIndex

from support import key_of

BT = 4
LAY = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=BT, dtype=torch.float32)

pytestmark = pytest.mark.store(hot=LAY.block_bytes * 400, warm=LAY.block_bytes * 8, block_tokens=BT,
                               sketch_dims=0)


def _append(m, seq, n_tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for layer in range(LAY.num_layers):
        k = torch.randn(LAY.kv_heads, n_tokens, LAY.head_dim, generator=gen)
        m.append(seq, layer, k, k)


def _rows(n, value=1.0):
    return torch.full((n, LAY.kv_heads), value)


# -- SummaryIndex --------------------------------------------------------------------------


def test_the_manager_holds_one_index_and_one_calibrator(store):
    m = store.manager
    assert isinstance(m.index, SummaryIndex) and isinstance(m.calibrator, Calibrator)
    assert m.index.basis_of == m.calibrator.basis
    assert not hasattr(m.open_sequence("a", LAY, "cpu"), "summ")  # a Seq carries no stacks


def test_a_stack_is_updated_in_place_and_grows_keeping_its_rows(store):
    m, ix = store.manager, store.manager.index
    seq = m.open_sequence("a", LAY, "cpu")
    _append(m, seq, 10 * BT + 2)
    s = ix.summaries(seq, 0)
    assert s.n == 11 and s.tokens.tolist() == [BT] * 10 + [2]
    blocks = m.blocks(seq, 0)
    assert all(torch.equal(s.kmin[i], b.summary.kmin) and torch.equal(s.kmax[i], b.summary.kmax)
               for i, b in enumerate(blocks[:10]))
    ix.note_attention(seq, 0, range(10), _rows(10, 0.5))
    ptr = s.mass.data_ptr()
    _append(m, seq, 3 * BT, seed=1)                        # the tail seals, two blocks more, a new tail
    s2 = ix.summaries(seq, 0)
    assert s2.n == 14 and s2.tokens.tolist() == [BT] * 13 + [2]
    assert s2.mass.data_ptr() == ptr                        # the same stack, restacked from row 10 on only
    assert torch.equal(s2.mass[:10], _rows(10, 0.5)) and not s2.mass[10:].any()
    assert torch.equal(s2.kmin[12], m.blocks(seq, 0)[12].summary.kmin)
    _append(m, seq, 60 * BT, seed=2)                        # past the first capacity (64 rows)
    s3 = ix.summaries(seq, 0)
    assert s3.n == 74 and s3.mass.data_ptr() != ptr
    assert torch.equal(s3.mass[:10], _rows(10, 0.5))       # grown: the rows (and their mass) kept
    assert all(torch.equal(s3.kmean[i], b.summary.kmean) for i, b in enumerate(m.blocks(seq, 0)))
    assert ix.stacked_layers(seq) == [0]


def test_mass_of_sealed_rows_stays_on_the_stack_until_synced(store):
    m, ix = store.manager, store.manager.index
    seq = m.open_sequence("a", LAY, "cpu")
    _append(m, seq, 3 * BT + 1)
    ix.summaries(seq, 0)
    ix.note_attention(seq, 0, [1, 3], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    blocks = m.blocks(seq, 0)
    assert not blocks[1].summary.mass.any()                 # sealed and stacked: on the stack only
    assert blocks[3].summary.mass.tolist() == [3.0, 4.0]    # the tail: in its own summary as well
    assert ix.summaries(seq, 0).mass[[1, 3]].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    ix.note_attention(seq, 0, [1], torch.tensor([[0.5, 0.5]]), replace=True)
    ix.sync_mass(seq)
    assert blocks[1].summary.mass.tolist() == [0.5, 0.5]
    ix.note_attention(seq, 1, [0], torch.tensor([[2.0, 2.0]]))   # a layer without a stack
    assert m.blocks(seq, 1)[0].summary.mass.tolist() == [2.0, 2.0] and ix.stacked_layers(seq) == [0]


def test_drop_writes_the_mass_back_unless_told_not_to(store):
    m, ix = store.manager, store.manager.index
    seq = m.open_sequence("a", LAY, "cpu")
    _append(m, seq, 4 * BT)
    for layer in range(2):
        ix.summaries(seq, layer)
        ix.note_attention(seq, layer, [0, 2], _rows(2, 1.5))
    ix.drop(seq, sync=False)
    assert ix.stacked_layers(seq) == [] and not m.blocks(seq, 0)[0].summary.mass.any()
    ix.summaries(seq, 0)
    ix.note_attention(seq, 0, [2], _rows(1, 2.0))
    ix.drop(seq)
    assert ix.stacked_layers(seq) == [] and m.blocks(seq, 0)[2].summary.mass.tolist() == [2.0, 2.0]
    assert ix.summaries(seq, 0).mass[2].tolist() == [2.0, 2.0]   # restacked from the summaries


def test_crop_and_close_drop_the_stacks(store):
    m, ix = store.manager, store.manager.index
    seq = m.open_sequence("a", LAY, "cpu")
    _append(m, seq, 5 * BT)
    ix.summaries(seq, 0)
    ix.note_attention(seq, 0, [1], _rows(1, 1.0))
    m.truncate(seq, 3 * BT)
    assert ix.stacked_layers(seq) == [] and m.blocks(seq, 0)[1].summary.mass.tolist() == [1.0, 1.0]
    ix.summaries(seq, 1)
    m.close_sequence(seq)
    assert ix.stacked_layers(seq) == []
    ix.summaries(seq, 0)                                     # read after close: not kept
    assert ix.stacked_layers(seq) == []


def test_a_clone_gets_its_own_copy_of_the_stacks(store):
    m, ix = store.manager, store.manager.index
    src = m.open_sequence("a", LAY, "cpu")
    _append(m, src, 6 * BT + 1)
    ix.summaries(src, 0)
    ix.note_attention(src, 0, [0, 4], _rows(2, 1.0))
    dst = m.clone_sequence(src)
    assert ix.stacked_layers(dst) == [0]
    assert m.blocks(src, 0)[4].summary.mass.tolist() == [1.0, 1.0]   # src's stacked mass synced
    a, b = ix.summaries(src, 0), ix.summaries(dst, 0)
    assert torch.equal(a.mass, b.mass) and torch.equal(a.kmin, b.kmin) and torch.equal(a.tokens, b.tokens)
    ix.note_attention(dst, 0, [4], _rows(1, 5.0))
    assert ix.summaries(src, 0).mass[4].tolist() == [1.0, 1.0]        # own tensors
    assert ix.summaries(dst, 0).mass[4].tolist() == [6.0, 6.0]
    assert m.blocks(dst, 0)[0].summary is not m.blocks(src, 0)[0].summary


def test_a_summary_to_write_covers_the_tokens_and_is_a_copy(store):
    m, ix = store.manager, store.manager.index
    seq = m.open_sequence("a", LAY, "cpu")
    _append(m, seq, BT + 2)
    tail = m.blocks(seq, 0)[1]
    assert tail.summary is None                              # stale since the append
    sm = ix.to_write(tail)
    assert sm.tokens == 2 and tail.summary is not None and tail.summary.tokens == 2
    sm.mass += 1.0
    assert not tail.summary.mass.any()                       # the writer's copy is its own


def test_write_now_stores_the_partial_blocks_summary_and_keeps_it(store):
    m = store.manager
    seq = m.open_sequence("a", LAY, "cpu")
    _append(m, seq, BT + 3)
    m.note_attention(seq, 0, [1], _rows(1, 0.25))
    keys = [key_of("tail", 1, layer) for layer in range(2)]
    m.set_layer_tail_keys(seq, keys)
    tails = [m.blocks(seq, layer)[1] for layer in range(2)]
    m.write_now(tails)
    for layer, b in enumerate(tails):
        stored = BlockSummary.unseal(keys[layer], bytes(store.cold.get("summaries", keys[layer])))
        assert b.durable and b.summary.tokens == stored.tokens == 3
        assert torch.equal(stored.kmax, b.summary.kmax) and torch.equal(stored.mass, b.summary.mass)
    assert tails[0].summary.mass.tolist() == [0.25, 0.25]


# -- Calibrator ----------------------------------------------------------------------------


def _meta(cold, key):
    raw = cold.get("meta", key)
    return None if raw is None else bytes(raw)


_OPEN: list = []  # cold stores the harnesses opened (closed by the autouse fixture below)


@pytest.fixture(autouse=True)
def _close_cold_stores():
    yield
    while _OPEN:
        _OPEN.pop().close()


class Harness:
    """A calibrator over a real cold store (LMDB under ``path``), with its background jobs
    queued so a test runs them when it chooses."""

    def __init__(self, path, dims=4, readonly=False):
        if readonly:
            ColdStore(path).close()  # a read-only store must exist
        self.cold = ColdStore(path, readonly=readonly)
        _OPEN.append(self.cold)
        self.jobs, self.resketched = [], []
        self.cal = Calibrator(self.cold, dims, submit=lambda fn, *a: self.jobs.append((fn, a)),
                              resketch=lambda blocks, basis: self.resketched.append((list(blocks), basis)))

    def run_jobs(self):
        while self.jobs:
            fn, a = self.jobs.pop(0)
            fn(*a)


def _block(seq):
    return SimpleNamespace(seq=seq)


def _keys(gen):
    k = torch.randn(LAY.kv_heads, BT, LAY.head_dim, generator=gen)
    return k * torch.linspace(3, 0.1, LAY.head_dim)


def _observe(h, seq, n_blocks, gen, layer=0):
    out = [_block(seq) for _ in range(n_blocks)]
    for b in out:
        h.cal.observe(LAY, layer, b, _keys(gen))
    return out


def test_calibrator_fits_after_enough_tokens_and_stores_the_basis_in_the_background(tmp_path):
    h, gen, seq = Harness(tmp_path / "c", dims=4), torch.Generator().manual_seed(0), object()
    first = _observe(h, seq, CALIB_TOKENS // BT - 1, gen)
    assert h.cal.basis(LAY, 0) is None and h.cal.pending(LAY, 0) == CALIB_TOKENS - BT
    assert not h.resketched and not h.jobs
    last = _observe(h, seq, 1, gen)
    basis = h.cal.basis(LAY, 0)
    assert basis is not None and basis.dims == 4 and h.cal.pending(LAY, 0) == 0
    (blocks, b), = h.resketched
    assert b is basis and blocks == first + last            # every block gathered for the fit
    assert _meta(h.cold, basis_key(LAY, 0)) is None          # not stored by the caller's thread
    h.run_jobs()
    assert _meta(h.cold, basis_key(LAY, 0)) is not None
    again = Calibrator(h.cold, 4, submit=lambda fn, *a: None, resketch=lambda blocks, basis: None)
    assert again.basis(LAY, 0).tag == basis.tag              # a later process reads it back
    _observe(h, seq, 3, gen)                                  # a fitted layer gathers nothing more
    assert h.cal.pending(LAY, 0) == 0 and len(h.resketched) == 1
    assert h.cal.basis(LAY, 1) is None                        # bases are per layer


def test_calibrator_adopts_a_basis_another_process_stored_first(tmp_path):
    h, gen, seq = Harness(tmp_path / "c", dims=4), torch.Generator().manual_seed(1), object()
    _observe(h, seq, CALIB_TOKENS // BT, gen)
    ours = h.cal.basis(LAY, 0)
    other = Harness(tmp_path / "other", dims=4)
    _observe(other, seq, CALIB_TOKENS // BT, torch.Generator().manual_seed(7))
    theirs = other.cal.basis(LAY, 0)
    assert theirs.tag != ours.tag
    h.cold.put_many("meta", [(basis_key(LAY, 0), theirs.seal(basis_key(LAY, 0)))])  # stored while ours was fitted
    h.run_jobs()
    assert h.cal.basis(LAY, 0).tag == theirs.tag
    assert _meta(h.cold, basis_key(LAY, 0)) == theirs.seal(basis_key(LAY, 0))


def test_calibrator_forgets_a_closed_sequences_blocks_but_keeps_their_statistics(tmp_path):
    h, gen = Harness(tmp_path / "c", dims=4), torch.Generator().manual_seed(2)
    a, b = object(), object()
    _observe(h, a, 10, gen)
    kept = _observe(h, b, 10, gen)
    h.cal.forget(a)
    assert h.cal.pending(LAY, 0) == 20 * BT
    kept += _observe(h, b, CALIB_TOKENS // BT - 20, gen)
    (blocks, _), = h.resketched
    assert blocks == kept


def test_calibrator_gathers_nothing_with_sketches_off_or_on_a_readonly_store(tmp_path, caplog):
    gen = torch.Generator().manual_seed(3)
    off = Harness(tmp_path / "off", dims=0)
    _observe(off, object(), CALIB_TOKENS // BT, gen)
    assert off.cal.basis(LAY, 0) is None and off.cal.pending(LAY, 0) == 0 and not off.jobs
    assert off.cold.entries("meta") == 0
    ro = Harness(tmp_path / "ro", dims=4, readonly=True)
    _observe(ro, object(), CALIB_TOKENS // BT, gen)
    assert ro.cal.basis(LAY, 0) is None and ro.cal.pending(LAY, 0) == 0 and not ro.jobs
    bad = Harness(tmp_path / "bad", dims=4)
    fitted = Harness(tmp_path / "fitted", dims=4)
    _observe(fitted, object(), CALIB_TOKENS // BT, gen)
    raw = bytearray(fitted.cal.basis(LAY, 0).seal(basis_key(LAY, 0)))
    raw[-1] ^= 1
    bad.cold.put_many("meta", [(basis_key(LAY, 0), bytes(raw))])
    with caplog.at_level(logging.WARNING, logger="tierstore.calibrator"):
        assert bad.cal.basis(LAY, 0) is None
    assert "without key sketches" in caplog.text
