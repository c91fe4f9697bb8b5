"""qanchor_lab: Query-as-Anchor user representations, reimplemented for notebooks."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Transparent huge pages for torch's large CPU tensors (PyTorch's CPU tuning guide: THP_MEM_ALLOC_ENABLE). Every
# pre-training step and MiniLM batch allocates and frees tensors of tens of MB, and without huge pages each comes
# back as fresh 4 KB pages: 30 million page faults in one `make demo`, 6% of its CPU time in the kernel. With them
# the demo computes the same bits in less time (docs/design.md §7.26; `python -m qanchor_lab bench hugepages`).
# torch reads the variable once, at its first allocation, so it is set here, before this package imports torch;
# a value set by the user (0 turns it off) is kept, and a process that imported torch first is left as it is.
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
