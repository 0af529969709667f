"""Storage keys set by a real mount: its stores mark CHANGED, its reads only REFERENCED."""

import hashlib
import os

import numpy as np

from kexec_sim.machine import Machine
from kexec_sim.ownership import PRESERVED
from kexec_sim.storage_keys import CHANGED, REFERENCED, SINCE_IMAGE
from pkramfs.byte_stream import BYTE_MAGIC
from pkramfs.page_stream import LINK_MAGIC
from pkramfs.pkram_node import NODE_MAGIC

from .conftest import Mounts
from .util import ctl_status, preserve

BATCH_BYTES = 8 << 20  # the page pool's batch: the mount then holds no idle page


def owned(machine: Machine, owner_id: object) -> np.ndarray:
    assert isinstance(owner_id, int)
    with machine.page_ownership() as ownership:
        return np.asarray(ownership.pages_of(owner_id), dtype=np.int64)


def test_writes_mark_changed_reads_only_referenced(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mount("pkram=keys")
    with machine.ram() as ram:
        keys = ram.keys.array
        changed_before = keys & CHANGED != 0
        data = os.urandom(BATCH_BYTES)
        (mnt / "f").write_bytes(data)  # opened write-only: direct I/O, no page cache
        state = ctl_status(mnt)
        assert state["idle_pages"] == 0 and state["used_pages"] == BATCH_BYTES // 4096
        pages = owned(machine, state["owner_id"])
        assert len(pages) == BATCH_BYTES // 4096
        newly_changed = (keys & CHANGED != 0) & ~changed_before
        assert newly_changed[pages].all()

        keys &= np.uint8(~REFERENCED & 0xFF)
        changed = (keys & CHANGED).copy()
        assert hashlib.md5((mnt / "f").read_bytes()).digest() == hashlib.md5(data).digest()
        assert (keys[pages] & REFERENCED != 0).all()
        assert np.array_equal(keys & CHANGED, changed)  # a read changes no page


def test_preserve_marks_the_pages_it_writes(machine: Machine, mounts: Mounts) -> None:
    mnt = mounts.mount("pkram=keyed")
    (mnt / "a").write_bytes(os.urandom(3 << 20))
    (mnt / "dir").mkdir()
    for i in range(200):
        (mnt / "dir" / f"small-{i}").write_bytes(os.urandom(100 + i))
    os.setxattr(mnt / "a", "user.note", b"x" * 500)
    with machine.ram() as ram:
        ram.keys.image_completed()
        preserve(mnt)
        with machine.page_ownership() as ownership:
            preserved = np.asarray(ownership.pages_of(PRESERVED), dtype=np.int64)
        since_image = ram.keys.array & SINCE_IMAGE != 0
        magics = [bytes(ram.pages[pfn, :8]) for pfn in preserved.tolist()]
    metadata = np.isin(magics, [NODE_MAGIC, LINK_MAGIC, BYTE_MAGIC])
    last = ctl_status(mnt)["last_preserve"]
    assert isinstance(last, dict)
    assert metadata.sum() >= 3 and (~metadata).sum() == last["data_pages"]
    assert since_image[preserved[metadata]].all()  # the node, byte and link pages it wrote
    assert not since_image[preserved[~metadata]].any()  # preserve copies no file data
