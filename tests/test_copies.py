"""The DDP/seeding/logging/checkpoint block is copied on purpose into every script; the copies must not drift."""
import os
import re

from conftest import ROOT

SCRIPTS = ["cifar.py", "imagenet.py", "transfer.py", "fewshot.py", "noisy.py"]
BLOCK = re.compile(r"^# ---- shared: DDP.*?^# ---- end shared -+$", re.S | re.M)


def shared_blocks():
    blocks = {}
    for name in SCRIPTS:
        path = os.path.join(ROOT, name)
        if os.path.exists(path):
            with open(path) as f:
                found = BLOCK.findall(f.read())
            assert len(found) == 1, f"{name} must hold exactly one shared block, found {len(found)}"
            blocks[name] = found[0]
    return blocks


def test_shared_blocks_are_identical():
    blocks = shared_blocks()
    assert blocks, "no script found"
    first_name, first = next(iter(blocks.items()))
    for name, block in blocks.items():
        if block != first:
            a, b = first.splitlines(), block.splitlines()
            line = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise AssertionError(f"the shared block of {name} differs from {first_name} at its line {line + 1}: "
                                 f"{b[line] if line < len(b) else '<end>'!r} vs {a[line] if line < len(a) else '<end>'!r}")
