"""Hibernation: the machine's page store written to an image on disk, and resumed from it.

Kept free of imports, so that any module of kexec_sim can use one of its modules.
"""
