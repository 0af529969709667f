"""Moving file pages out of a pfn range (where a kexec is about to write its kernel): the data
is copied to pages outside it, a page for a page, and each file's page index follows."""

import numpy as np

from kexec_sim import HUGE_ORDER, HUGE_PAGES

from . import file_data
from .file_pages import CHUNK_SHIFT, page_entries
from .tree import Tree


def relocate_out_of(tree: Tree, start: int, end: int) -> int:
    """Move the file pages of *tree* in pfns ``start .. end - 1`` to pages outside them (the
    data copied, each file's page index updated); return how many pages moved."""
    if not tree.pool.owns_any(start, end):
        return 0
    avoid = (start, end)
    moved = 0
    for ino in tree.inodes.quiet.inos_with_pages_in(start, end):
        tree.inodes.get(ino)  # quiet inodes with pages inside become objects
    for inode in list(tree.inodes.in_use()):
        if inode.pages is None or inode.pages.nr_pages == 0:
            continue
        pfns, orders, indexes, _ = page_entries([inode.pages])
        inside = (pfns < end) & (pfns + (np.int64(1) << orders) > start)
        if not inside.any():
            continue
        secret = tree.is_secret(inode)
        small = inside & (orders == 0)
        if small.any():
            old = pfns[small]
            new = tree.pool.replacements(len(old), avoid)
            file_data.copy_pages(tree.ram, old, new, secret)
            inode.pages.replace_pages(indexes[small], new)
            tree.pool.release_replaced(old)
            moved += len(old)
        huge = inside & (orders == HUGE_ORDER)
        for base, index in zip(pfns[huge].tolist(), indexes[huge].tolist(), strict=True):
            new_base = tree.pool.huge_replacement(avoid)
            old = np.arange(base, base + HUGE_PAGES, dtype=np.int64)
            file_data.copy_pages(tree.ram, old, old - base + new_base, secret)
            inode.pages.replace_huge(index >> CHUNK_SHIFT, new_base)
            tree.pool.release_replaced(old)
            moved += HUGE_PAGES
    return moved
