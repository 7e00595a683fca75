"""Dirty logging: which guest frames were written since the last look (live
migration's question; KVM's KVM_GET_DIRTY_LOG).

A frame is logged when a spte that maps it becomes writable (``set_spte``), when
the MMU emulates a store to it, and when the guest walk sets A/D in one of its
tables; turning logging on, and reading the log, write-protect every spte into
the slot so the next write faults and is logged again.
"""

from __future__ import annotations


class DirtyLog:
    """The dirty-log share of ShadowMMU (``dirty_logging``: any memslot logging)."""

    def mark_dirty(self, gfn: int) -> None:
        if not self.dirty_logging:
            return
        s = self.gmem.slot_of(gfn)
        if s is not None and s.dirty_bitmap is not None:
            s.dirty_bitmap[gfn - s.base_gfn] = 1

    def enable_dirty_log(self, slot) -> None:
        """Start logging: every writable spte into the slot loses W, so each first
        write after this faults and is logged."""
        slot.dirty_bitmap = bytearray(slot.npages)
        self.dirty_logging = True
        for gfn in [g for g in self.rmap if slot.contains(g)]:
            self.rmap_write_protect(gfn)
        self.flush_tlbs()

    def disable_dirty_log(self, slot) -> None:
        """Stop logging the slot.  Sptes write-protected for logging stay so until
        the guest's next write to them faults (a harmless extra exit)."""
        slot.dirty_bitmap = None
        self.dirty_logging = any(s.dirty_bitmap is not None for s in self.gmem.slots)

    def get_dirty_log(self, slot) -> list[int]:
        """Dirty gfns since the last call; clears the log and write-protects them again."""
        if slot.dirty_bitmap is None:
            raise ValueError(f"dirty logging is not enabled on memslot {slot.id}")
        bm = slot.dirty_bitmap
        dirty = [slot.base_gfn + i for i, b in enumerate(bm) if b]
        slot.dirty_bitmap = bytearray(slot.npages)
        for gfn in dirty:
            self.rmap_write_protect(gfn)
        self.flush_tlbs()
        return dirty
