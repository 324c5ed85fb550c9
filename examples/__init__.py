"""Example plug-in targets, one per file (see README.md here and docs/targets.md).

A package so that the tests, run from the repository's root, can name them as
``examples.ramdisk:RamDisk``; a user passes the file: ``--plugin examples/ramdisk.py:RamDisk``.
"""
