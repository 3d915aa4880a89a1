"""Tests of the block every script copies (DDP, checkpoints, --out/--resume, argument and error rules), run through
cifar.py's copy (tests/test_copies.py keeps the copies equal), and of how every script fails: one line, no traceback,
under python and under torchrun; and a torchrun whose rank is killed mid-run, restarted, ending where an
uninterrupted run ends."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cifar
from conftest import ROOT, _free_port, make_image_tree, run_torchrun

SCRIPTS = ["cifar.py", "imagenet.py", "transfer.py", "fewshot.py", "noisy.py"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def refused(**values):
    """The message with which check_numbers refuses these values (None: accepted)."""
    args = argparse.Namespace(**{"epochs": 10, "batch_size": 8, **values})
    try:
        cifar.check_numbers(cifar.Parser(), args)
    except SystemExit as e:
        return str(e)
    return None


def test_numbers_follow_one_rule():
    assert "--epochs must be > 0" in refused(epochs=0) and "--epochs must be > 0" in refused(epochs=-1)
    assert "--batch-size must be > 0" in refused(batch_size=0)
    assert "--tau must be > 0" in refused(tau=0.0) and "--tau" in refused(tau=-1.0)
    assert "finite, got nan" in refused(tau=float("nan")) and "finite, got inf" in refused(lr=float("inf"))
    assert "--train-subset must be >= 0" in refused(train_subset=-5)
    assert "--noise-rate must be in [0, 1]" in refused(noise_rate=1.5)
    assert "--milestones must be >= 0" in refused(milestones=[10, -1])
    assert "--warmup-epochs 10 must be below --epochs 10" in refused(warmup_epochs=10)
    assert refused(tau=0.5, lr=None, train_subset=0, warmup_epochs=9, noise_rate=0.0, resume=False, loss="kd") is None
    assert refused(epochs=None, warmup_epochs=3) is None   # fewshot: --epochs defaults per stage


def test_a_checkpoint_that_runs_code_is_refused_and_bad_files_name_their_flag(tmp_path):
    """weights_only loading: a pickle holding an arbitrary object (it could run code) is refused with one line."""
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": argparse.Namespace(x=1)}, evil)
    with pytest.raises(SystemExit, match=r"--teacher-ckpt .*evil.pt is not a readable weights-only"):
        cifar.load_state_dict(str(evil), "--teacher-ckpt")
    with pytest.raises(SystemExit, match="is a folder"):
        cifar.read_checkpoint(str(tmp_path), "--eval-only")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"--init .*empty.pt is not a readable"):
        cifar.read_checkpoint(str(tmp_path / "empty.pt"), "--init")
    good = tmp_path / "good.pt"
    torch.save({"model": {"module.w": torch.ones(2)}, "args": {"lr": 0.1, "milestones": [1, 2]}, "epoch": 3}, good)
    assert torch.equal(cifar.load_state_dict(str(good), "--init")["w"], torch.ones(2))


def open_run(out, **changes):
    args = argparse.Namespace(out=str(out), resume=False, overwrite=False, epochs=4, lr=0.1, seed=0, stop_after=0)
    vars(args).update(changes)
    return cifar.open_run(args, 0), args


def test_out_and_resume_never_mix_two_runs(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--out .* is a file"):
        open_run(tmp_path / "file")
    out = tmp_path / "run"
    assert open_run(out)[0] is None and out.is_dir()                     # a new folder: a fresh run
    (out / "log.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(SystemExit, match="holds a run .*log.jsonl.*pass --resume to continue it, --overwrite"):
        open_run(out)
    assert open_run(out, resume=True)[0] is None and not (out / "log.jsonl").exists()   # no checkpoint: afresh
    assert "no checkpoint" in capsys.readouterr().out
    # a checkpoint after 2 epochs, a log with a line of epoch 2 (written after it) and a cut-off line, stale temps
    _, args = open_run(out)
    torch.save({"model": {}, "epoch": 2, "args": vars(args)}, out / "checkpoint.pt")
    (out / "log.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n{"epo')
    (out / "checkpoint.pt.tmp").write_bytes(b"half")
    (out / "results.json.tmp").write_text("{")
    with pytest.raises(SystemExit, match=r"other --lr \(0.1 there, 0.2 now\), --seed \(0 there, 1 now\)"):
        open_run(out, resume=True, lr=0.2, seed=1)
    ckpt, _ = open_run(out, resume=True, epochs=6, stop_after=5)        # allowed changes, with a warning for epochs
    assert ckpt["epoch"] == 2 and "warning: --epochs 6 (was 4)" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == [0, 1]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl"]
    assert open_run(out, overwrite=True)[0] is None and os.listdir(out) == []


def test_progress_reports_inside_an_epoch(capsys):
    progress = cifar.Progress(0, steps=10, images_per_step=64, epochs_left=3, every=0.0)
    time.sleep(0.01)
    progress.step(4)
    line = capsys.readouterr().out
    assert "step 4/10" in line and "images/s" in line and "epoch ends in" in line and "the run in" in line
    cifar.Progress(1, steps=10, images_per_step=64, every=0.0).step(4)   # only rank 0 speaks
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_user_error_is_one_line_without_traceback(script):
    proc = subprocess.run([sys.executable, script, "--batch-size", "0"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"{script}: error: --batch-size must be > 0 and finite, got 0"]


def test_a_user_error_under_torchrun_is_one_line_not_one_per_rank(tmp_path):
    """Our processes print one line between them (torchrun then adds its own failure report); no Python traceback
    of ours."""
    missing = tmp_path / "missing.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "cifar.py", "--dataset", "synthetic", "--model", "resnet8", "--eval-only",
           str(missing)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "cifar.py: error:" in line]
    assert proc.returncode != 0 and len(ours) == 1 and "--eval-only" in ours[0] and "missing" in ours[0], ours
    assert 'cifar.py", line' not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Per script: arguments that find real (tiny) data, so that only the bad input under test can fail."""
    from test_fewshot import write_pickles
    root = tmp_path_factory.mktemp("inputs")
    tree = make_image_tree(str(root / "tree"), num_classes=3, per_class=4, size=32)
    (root / "corrupt.pt").write_bytes(b"\x80\x02not a checkpoint")
    (root / "file").write_text("x")
    os.makedirs(root / "mini")
    return root, {
        "cifar": ["--dataset", "synthetic", "--model", "resnet8", "--warmup-epochs", "0", "--epochs", "1"],
        "imagenet": ["--data-dir", tree, "--model", "resnet18", "--image-size", "32", "--workers", "0"],
        "transfer": ["--data-dir", tree, "--model", "vit_tiny_test", "--image-size", "32", "--workers", "0",
                     "--warmup-epochs", "0", "--epochs", "1", "--loss", "ce"],
        "fewshot": ["--data-dir", write_pickles(root / "mini"), "--width", "4", "--image-size", "16", "--query", "3"],
        "noisy": ["--dataset", "synthetic", "--model", "preact_resnet18_w8", "--warmup-epochs", "0"],
    }


BAD_INPUTS = [  # (arguments, what the one line must name)
    (["--epochs", "0"], "--epochs must be > 0"), (["--epochs", "-1"], "--epochs must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"), (["--tau", "0"], "--tau must be > 0"),
    (["--tau", "-1"], "--tau must be > 0"), (["--tau", "nan"], "--tau must be > 0 and finite, got nan"),
    (["--lr", "0"], "--lr must be > 0"), (["--seed", "-1"], "--seed must be >= 0"),
    (["--eval-only", "{root}/missing.pt"], "--eval-only {root}/missing.pt is missing"),
    (["--eval-only", "{root}"], "--eval-only {root} is a folder"),
    (["--eval-only", "{root}/corrupt.pt"], "--eval-only {root}/corrupt.pt is not a readable weights-only"),
    (["--out", "{root}/file"], "--out {root}/file is a file"),
]


@pytest.mark.parametrize("script", [name[:-3] for name in SCRIPTS])
def test_bad_inputs_of_every_script_stop_with_one_line(script, inputs):
    """Each bad input raises the script's UserError, a SystemExit whose message is one line (Python prints it alone,
    no traceback, and exits 1; test_a_user_error_is_one_line_without_traceback runs the processes)."""
    module, (root, base) = __import__(script), inputs
    for argv, says in BAD_INPUTS:
        argv = [a.format(root=root) for a in argv]
        with pytest.raises(SystemExit) as stop:
            module.main(module.parse_args([*base[script], *argv]))
        message = str(stop.value)
        assert isinstance(stop.value, module.UserError) and "\n" not in message, (script, argv, message)
        assert ": error: " + says.format(root=root) in message, (script, argv, message)


def worker_pids(parent):
    """The PIDs of the processes whose parent is `parent` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return pids


ARGV = ["--dataset", "synthetic", "--model", "resnet8", "--loss", "ce", "--epochs", "4", "--warmup-epochs", "0",
        "--batch-size", "16", "--train-subset", "512", "--test-subset", "64", "--resume"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted two-process single-node run."""
    out = tmp_path_factory.mktemp("whole")
    run_torchrun("cifar.py", [*ARGV, "--out", out])
    return out


def same_run(a, b):
    logs = [[json.loads(line) for line in open(out / "log.jsonl")] for out in (a, b)]
    assert [r["epoch"] for r in logs[1]] == [0, 1, 2, 3]
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]]
    weights = [torch.load(out / "checkpoint.pt", weights_only=True)["model"] for out in (a, b)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_two_nodes_on_localhost_equal_one_node_with_two_processes(whole, tmp_path):
    """`torchrun --nnodes=2 --nproc_per_node=1` with the c10d rendezvous, one process per "node", gloo: the same
    run as two processes on one node."""
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=two_nodes",
                               "cifar.py", *ARGV, "--out", str(tmp_path)], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    assert json.load(open(tmp_path / "results.json"))["world_size"] == 2
    same_run(whole, tmp_path)


def test_a_rank_killed_mid_run_is_restarted_and_ends_as_an_uninterrupted_run(whole, tmp_path):
    """`torchrun --standalone --max-restarts=1 ... --resume`: one command for the first launch and the restart. Rank 1
    is killed (SIGKILL) once the first epoch's checkpoint exists; torchrun restarts both ranks, which resume from it."""
    out = tmp_path / "killed"
    # the agent's store outlives the killed workers: without the restart prefix of setup_distributed, the restarted
    # workers could read a killed worker's address there and hang connecting to it (seen 2 times in 4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "cifar.py", *ARGV, "--out", str(out)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    workers = worker_pids(launcher.pid)
    assert len(workers) == 2 and launcher.poll() is None, "the run ended before it could be killed"
    os.kill(max(workers), signal.SIGKILL)
    output = launcher.communicate(timeout=600)[0]
    assert launcher.returncode == 0, output[-3000:]
    assert "resuming" in output, output[-3000:]
    same_run(whole, out)
