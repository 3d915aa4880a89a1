"""Stress check for issue "flaky torchrun exits": runs each script's 2-process CPU torchrun (gloo) N times and prints
every failure with its exit code and the last lines of its output. Not part of the test suite (it takes minutes):

    python tests/stress_torchrun.py            # 30 runs of each of the five scripts
    python tests/stress_torchrun.py -n 5 cifar noisy

Exit status 1 if any run failed. The image scripts train on an image tree or pickles written once into a temporary
folder."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, _free_port, make_image_tree   # noqa: E402
from test_fewshot import write_pickles   # noqa: E402


def commands(tmp):
    """One tiny 2-process run of every script, each training on real or generated images for a few steps."""
    tree = make_image_tree(os.path.join(tmp, "tree"), num_classes=3, per_class=8, size=32)
    os.makedirs(os.path.join(tmp, "mini"))
    mini = write_pickles(os.path.join(tmp, "mini"))   # tiny miniImageNet pickles
    return {
        "cifar": ["cifar.py", "--dataset", "synthetic", "--model", "wrn_16_1", "--loss", "ce", "--epochs", "1",
                  "--warmup-epochs", "0", "--batch-size", "16", "--train-subset", "64", "--test-subset", "101"],
        "imagenet": ["imagenet.py", "--data-dir", tree, "--model", "resnet18", "--loss", "ce", "--epochs", "1",
                     "--batch-size", "4", "--image-size", "32", "--workers", "0", "--warmup-epochs", "0"],
        "transfer": ["transfer.py", "--data-dir", tree, "--model", "vit_tiny_test", "--loss", "ce", "--epochs", "1",
                     "--batch-size", "4", "--image-size", "32", "--workers", "0", "--warmup-epochs", "0"],
        "fewshot": ["fewshot.py", "--data-dir", mini, "--stage", "classifier", "--model", "resnet12", "--width", "4",
                    "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--query", "3",
                    "--val-episodes", "10", "--test-episodes", "10"],
        "noisy": ["noisy.py", "--dataset", "synthetic", "--model", "preact_resnet18_w8", "--loss", "ce",
                  "--epochs", "2", "--warmup-epochs", "0", "--finetune-epochs", "1", "--batch-size", "16",
                  "--knn-k", "20", "--noise-rate", "0.4"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scripts", nargs="*", default=["cifar", "imagenet", "transfer", "fewshot", "noisy"])
    p.add_argument("-n", type=int, default=30, help="runs per script")
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    failures, runs = [], 0
    try:
        cmds = commands(tmp)
        for name in args.scripts:
            for i in range(args.n):
                out = os.path.join(tmp, f"{name}{i}")
                env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                       f"--master_port={_free_port()}", os.path.join(ROOT, cmds[name][0]), *cmds[name][1:],
                       "--out", out]
                start = time.time()
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
                runs += 1
                ok = proc.returncode == 0 and os.path.isfile(os.path.join(out, "results.json"))
                print(f"{name} {i + 1}/{args.n}: {'ok' if ok else 'FAILED'} (exit {proc.returncode}, "
                      f"{time.time() - start:.0f} s)", flush=True)
                if not ok:
                    failures.append(name)
                    print((proc.stdout + proc.stderr)[-3000:], flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(failures)} of {runs} runs failed" + (f": {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
