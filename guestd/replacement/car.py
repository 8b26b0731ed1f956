"""``car``: CLOCK with Adaptive Replacement, the working-set policy (recency *and* frequency).

Why CAR (Bansal & Modha, FAST 2004): it is ARC (recency list + frequency
list, each with a ghost list of recently evicted page ids, and an adaptive
target size for the recency side) built from two clocks, so a hit only sets
the R bit, exactly what MMU hardware gives a real guest and what our
vectorised hit path does. A page referenced once (cold anonymous memory
touched at allocation, a sequential scan) stays in the recency clock T1 with
R=0 and is the first to go; a page referenced again while resident (the hot
database cache) moves to the frequency clock T2 and survives scans and cold
allocations. The ghost lists tune the split between the two sides.

Definition (c = capacity: frames not held by the kernel or the balloon;
T1, T2 are circular lists of resident frames, head = where the hand points,
new entries go to the tail; B1, B2 are LRU lists of page ids; p starts at 0):

on a hit: R=1 (done by the kernel).

select_victim (the paper's ``replace``), repeated until a page is found:
  if |T1| >= max(1, p) (or T2 is empty):
      head of T1 with R=0: remove it, its page id goes to the MRU end of B1: victim;
      head of T1 with R=1: R=0, move it to the tail of T2;
  else:
      head of T2 with R=0: remove it, its page id goes to the MRU end of B2: victim;
      head of T2 with R=1: R=0, move it to the tail of T2.

on_load of page x (R=0 in every case):
  x in B1: p = min(p + max(1, |B2|/|B1|), c); remove x from B1; tail of T2.
  x in B2: p = max(p - max(1, |B1|/|B2|), 0); remove x from B2; tail of T2.
  else: if |T1| + |B1| >= c: drop the LRU id of B1 (if any);
        elif |T1| + |T2| + |B1| + |B2| >= 2c: drop the LRU id of B2 (if any);
        tail of T1.
  (|B1|/|B2| are measured before x is removed.) The paper trims only when
  the cache is full; trimming with ``>=`` at every load is the same while c
  is fixed (ghost lists are empty until the cache has filled) and keeps the
  directory within 2c when the balloon shrinks c.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from .base import PolicyBase

__all__ = ["CarPolicy"]


class CarPolicy(PolicyBase):
    name = "car"
    load_sets_r = False

    def __init__(self, n_frames: int) -> None:
        super().__init__(n_frames)
        self.t1: deque[int] = deque()            # recency clock (gpfns)
        self.t2: deque[int] = deque()            # frequency clock (gpfns)
        self.b1: OrderedDict[int, None] = OrderedDict()   # ghosts evicted from T1 (page ids, LRU first)
        self.b2: OrderedDict[int, None] = OrderedDict()   # ghosts evicted from T2
        self.p = 0.0                                       # target size of T1

    def on_load(self, gpfn: int, write: bool, ref: int) -> None:
        fr = self.frames
        assert fr is not None
        fr.R[gpfn] = False
        x = int(fr.vpage[gpfn])
        c = self.capacity_pages
        b1, b2 = self.b1, self.b2
        if x in b1:
            self.p = min(self.p + max(1.0, len(b2) / len(b1)), float(c))
            del b1[x]
            self.t2.append(gpfn)
        elif x in b2:
            self.p = max(self.p - max(1.0, len(b1) / len(b2)), 0.0)
            del b2[x]
            self.t2.append(gpfn)
        else:
            if len(self.t1) + len(b1) >= c:
                if b1:
                    b1.popitem(last=False)
            elif len(self.t1) + len(self.t2) + len(b1) + len(b2) >= 2 * c:
                if b2:
                    b2.popitem(last=False)
            self.t1.append(gpfn)

    def select_victim(self) -> int:
        fr = self.frames
        assert fr is not None
        R, t1, t2 = fr.R, self.t1, self.t2
        while t1 or t2:
            if t1 and (len(t1) >= max(1.0, self.p) or not t2):
                g = t1.popleft()
                if not fr.resident[g]:
                    continue    # defensive: left the pool behind our back
                if not R[g]:
                    self.b1[int(fr.vpage[g])] = None
                    return g
                R[g] = False
                t2.append(g)
            else:
                g = t2.popleft()
                if not fr.resident[g]:
                    continue
                if not R[g]:
                    self.b2[int(fr.vpage[g])] = None
                    return g
                R[g] = False
                t2.append(g)
        return -1
