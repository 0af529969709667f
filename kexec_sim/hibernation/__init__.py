"""Hibernation: the machine's page store written to an image on disk, and resumed from it.

The image: ``format`` (header, pfn list; docs/FORMAT.md), ``crypto`` (keys, nonces),
``chunks`` (how a chunk is stored; the one decoder), ``writer`` (``write_image``) and
``reader`` (``open_image``, then one pass: ``Image.read_into``) and ``undo`` (what that
overwrote). The commands: ``hibernate`` (preserve, hand over, run ``writer_process``, power
off), ``resume`` (check a chain's fronts, restore it in one pass, boot), ``last_image`` (what
RAM was resumed from), ``cli``, ``progress`` and ``report``.

Kept free of imports, so that any module of kexec_sim can use one of its modules.
"""
