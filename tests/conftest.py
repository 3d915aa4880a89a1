"""Shared test fixtures: where the real data is, how to launch a script under a real two-process torchrun, how to
count host syncs, and the CPU pin of every test outside tests/test_gpu.py."""
import collections
import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the real CIFAR-100 copy that sits beside every checkout (and beside CI's clean clone)
SHARED_DATA = os.environ.get("W2S_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def cpu_only(request, monkeypatch):
    """Every test outside tests/test_gpu.py runs on the CPU, also on a machine with a GPU: the tests compare runs with
    each other (torchrun on gloo against one process, a resumed run against an uninterrupted one), and a CUDA run
    would differ from a CPU one in its last bits. The scripts pick CUDA when torch.cuda.is_available()."""
    if not request.node.path.name == "test_gpu.py":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


HOST_SYNCS = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero", "masked_select"]


@contextlib.contextmanager
def count_host_syncs():
    """Counts, in a Counter, the tensor operations that make the host wait for the GPU on CUDA: reading values back
    (.item, .tolist, .cpu, .numpy, bool/int/float of a tensor) and data-dependent shapes (nonzero, unique,
    masked_select, indexing or assigning with a boolean mask). On the CPU nothing waits, so
    torch.cuda.set_sync_debug_mode reports nothing there; counting the calls stands in for it (tests/test_gpu.py uses
    the real mode on a GPU). Host-to-device copies are not seen here: on the CPU they are no copies at all."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_SYNCS}
    getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__
    masked_select, nonzero, unique = torch.masked_select, torch.nonzero, torch.unique

    def counted(name):
        def call(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return call

    def boolean_index(index):
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    def indexed(self, index):
        if boolean_index(index):
            counts["boolean-mask indexing"] += 1
        return getitem(self, index)

    def assigned(self, index, value):
        if boolean_index(index):
            counts["boolean-mask assignment"] += 1
        return setitem(self, index, value)

    try:
        for name in HOST_SYNCS:
            setattr(torch.Tensor, name, counted(name))
        torch.Tensor.__getitem__, torch.Tensor.__setitem__ = indexed, assigned
        torch.masked_select = lambda *a, **k: counts.update(["masked_select"]) or masked_select(*a, **k)
        torch.nonzero = lambda *a, **k: counts.update(["nonzero"]) or nonzero(*a, **k)
        torch.unique = lambda *a, **k: counts.update(["unique"]) or unique(*a, **k)
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.Tensor.__getitem__, torch.Tensor.__setitem__ = getitem, setitem
        torch.masked_select, torch.nonzero, torch.unique = masked_select, nonzero, unique


def syncs_per_step(run, few=1, more=3):
    """Host syncs that grow with the number of training steps: run(steps) twice, with `few` and `more` steps (e.g. the
    script's --benchmark STEPS, the ordinary training loop), and the difference of the counts per extra step. Syncs
    at the start and end of an epoch (logging) are the same in both runs and cancel."""
    with count_host_syncs() as a:
        run(few)
    first = dict(a)
    with count_host_syncs() as b:
        run(more)
    return {name: (b[name] - first.get(name, 0)) / (more - few) for name in set(b) | set(first)
            if b[name] != first.get(name, 0)}


@pytest.fixture
def cifar100_dir():
    """Directory holding cifar-100-python/ (real data, read-only)."""
    path = os.path.join(SHARED_DATA, "cifar-100-python")
    if not os.path.isdir(path):
        why = (f"real CIFAR-100 not found at {path}: set W2S_SHARED_DATA to the folder holding cifar-100-python/, "
               "or fetch it into DIR with python -c \"import torchvision; torchvision.datasets.CIFAR100('DIR', "
               "download=True)\"")
        if os.environ.get("W2S_REQUIRE_DATA"):   # CI: a skipped real-data test is a failure
            pytest.fail(why)
        pytest.skip(why)
    return SHARED_DATA


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script, args, nproc=2, timeout=600):
    """Runs `torchrun --nproc_per_node=nproc script args` on CPU (gloo) and returns the CompletedProcess;
    fails the test with the processes' output when the run fails."""
    # PYTHONFAULTHANDLER: a process killed by a signal prints every thread's Python stack into the failure report
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} failed with exit code {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return proc


def make_image_tree(root, splits=("train", "val"), num_classes=3, per_class=8, size=32, seed=0, ext="JPEG"):
    """Writes a small learnable image tree root/<split>/class_<k>/<i>.<ext>: each class has its own colour and
    stripe orientation plus noise, so a few steps of training beat chance. Returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for split in splits:
        for k in range(num_classes):
            folder = os.path.join(root, split, f"class_{k:03d}")
            os.makedirs(folder, exist_ok=True)
            colour = np.array([(97 * k) % 256, (53 * k + 80) % 256, (181 * k + 40) % 256], dtype=np.float32)
            stripes = np.sin((xx if k % 2 else yy) * (0.4 + 0.15 * k))[..., None] * 60
            for i in range(per_class):
                img = colour + stripes + rng.normal(0, 25, size=(size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.{ext}"))
    return root
