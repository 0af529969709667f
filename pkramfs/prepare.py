"""The prepare phase: while the mount serves, inodes no longer in use go back into columns
(`InodeTable.freeze`), so that ``remount,preserve`` reads only the inodes in use one by one
and takes the rest as ready columns: a preserve costs what the working set costs, not what the
tree holds. (The kernel's Live Update Orchestrator has a prepare phase before its freeze.)

One trio task beside the FUSE loop. Every PASS_S it freezes the inodes that were objects
before its previous pass already and did not change during the last PASS_S (a directory
being filled or a file being written stays an object), BATCH_INODES at a time (a millisecond
or two), each batch followed by a pause three times as long: a request waits at most one
batch, and freezing takes at most a quarter of the daemon's time while requests flow. A
failure is logged and ends the preparing, never the mount: a preserve then reads more inodes
one by one.
"""

import logging
import time

import trio

from .tree import Tree

log = logging.getLogger(__name__)

PASS_S = 0.1
PASS_NS = int(PASS_S * 1e9)
BATCH_INODES = 1000
PAUSE_PER_BATCH = 3  # times the batch's own time


async def keep_prepared(tree: Tree) -> None:
    """Freeze *tree*'s settled inodes, pass after pass, until cancelled."""
    try:
        while True:
            await trio.sleep(PASS_S)
            changed_since_ns = time.time_ns() - PASS_NS
            while tree.inodes.settled:
                started = time.perf_counter()
                tree.inodes.freeze(BATCH_INODES, changed_since_ns)
                await trio.sleep(PAUSE_PER_BATCH * (time.perf_counter() - started))
            tree.inodes.age()
    except Exception:
        log.exception("preparing for preserve failed: preserves read every inode from now on")
