"""The bottom of every layer: errors, sizes and the command-line plumbing.

Nothing here imports the rest of ublkml; everything else may import this.
"""
