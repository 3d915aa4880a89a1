"""Weak-to-strong generalization under label noise (paper Table 7): Sel-CL+ on CIFAR-10/100 with a weak teacher.

A PreAct ResNet-18 teacher supervises a PreAct ResNet-34 student whose training labels carry symmetric (20%) or
asymmetric (40%) noise, inside Sel-CL+ (Li et al., CVPR 2022; github.com/ShikunLi/Sel-CL as reused by
github.com/ggjy/vision_weak_to_strong). Stage one (Sel-CL, --epochs) selects confident examples and pairs by kNN votes
and trains as the official code: MoCo (EMA key encoder, 10,000-key queue) in the warm-up epoch and for samples with <2
confident partners, supervised contrast with mixup over the batch and (from epoch 4) a 100·C·2 queue, the similarity
loss (own backward, clip 0.25), mixup CE on confident examples; two "complex" views, a forward pass each. Stage two
(Sel-CL+, --finetune-epochs) fine-tunes a new classifier on the confident examples with the teacher's term (--loss; the
teacher in train mode as the official code, --teacher-mode). Under torchrun the losses are the global batch's
(gathered, queues identical, BatchNorm statistics global, gradients summed): 8 × --batch-size 16 runs 1 × 128.

  python noisy.py --dataset cifar100 --data-dir data --model preact_resnet18 --loss ce --out runs/t
  python noisy.py --dataset cifar100 --data-dir data --noisy-labels runs/t/noisy_labels.npy \
      --loss adaptconf --teacher-ckpt runs/t/stage1_model.pt --out runs/adaptconf

Paper, CIFAR-100 symmetric 20% (top-1, mean of 3): teacher PR18 76.16, student PR34 78.20, with AdaptConf 78.64.
Differs from the official code: colour jitter in float without PIL's uint8 rounding between ops; bf16 autocast instead
of apex O1; no sample votes for itself in the kNN (the official code drops column j of each batch's row j); the pair
quantile from a 20,001-bin histogram; the last incomplete batch dropped (fixed shapes, no host sync); under torchrun,
BatchNorm in train mode on the global batch's statistics (one process: as the official code).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from common import (adaptconf_beta, adaptconf_loss, augconf_alpha, augconf_loss, beta_counts, beta_summary, kd_loss,
                    rkd_loss, topk_correct)

# ---- shared: DDP, seeding, logging, checkpoints, errors ----------------------------------------------------------
# Copied on purpose, identically, into every script (tests/test_copies.py keeps the copies equal): edit all together.

class UserError(SystemExit):
    """A mistake in the command line or in a file it names: Python prints this one line, no traceback, and exits 1.
    Under torchrun, ranks other than 0 wait 5 s first: when rank 0 fails too, torchrun stops them before they repeat."""
    def __init__(self, message):
        if int(os.environ.get("RANK", 0)) > 0:
            time.sleep(5)
        super().__init__(f"{os.path.basename(sys.argv[0])}: error: {message}")


class Parser(argparse.ArgumentParser):   # argparse's errors as one UserError line (no usage block, no repeat per rank)
    def error(self, message):
        raise UserError(message)


POSITIVE = {"epochs", "batch_size", "lr", "blr", "finetune_lr", "tau", "kd_T", "dkd_T", "image_size", "width", "way",
            "shot", "query", "episodes_per_batch", "batches_per_epoch", "val_episodes", "test_episodes", "knn_k",
            "crop_fraction"}
FRACTION = {"noise_rate", "select_quantile", "pair_quantile", "label_smoothing", "drop_path", "crop_fraction",
            "alpha_max"}


def check_numbers(p, args):
    """The same rule in every script: every number finite, counts/sizes/rates/temperatures > 0, fractions in [0, 1],
    everything else (weights, subsets, seeds, warm-ups, workers, --benchmark) >= 0; the warm-up shorter than the run."""
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v) or v < 0 or (name in POSITIVE and v == 0) or (name in FRACTION and v > 1):
                rule = {(1, 1): "in (0, 1]", (1, 0): "> 0", (0, 1): "in [0, 1]"}.get(
                    (name in POSITIVE, name in FRACTION), ">= 0")
                p.error(f"{flag} must be {rule} and finite, got {v}")
    if getattr(args, "warmup_epochs", None) and args.epochs is not None and args.warmup_epochs >= args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} must be below --epochs {args.epochs}, or the lr never peaks")


def setup_distributed():
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store, restart = None, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":   # torchrun restarted the workers:
        store = dist.PrefixStore(f"restart{restart}", dist.TCPStore(   # its store still holds the addresses of the
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False))   # killed ones
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size)
    return rank, world_size, device


def cleanup_distributed():
    """In main's `finally`. After success, waits for every process (none exits while another still writes); with an
    exception on its way out, leaves at once (torchrun then stops the others)."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor):   # in place over all processes; a no-op without DDP
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_buffers(model):   # rank 0's BatchNorm statistics to all, before evaluating (DDP syncs them in training)
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def seeded(*keys, device="cpu"):
    """A torch.Generator seeded by a hash of `keys`, e.g. ("augment", seed, rank, epoch): every random stream is fixed
    by what it is for, so --resume needs no saved RNG state and no two streams coincide."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def check_finite(means, epoch):   # epoch means, equal on all processes: all stop together, and no host sync per step
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(f"the loss became non-finite in epoch {epoch} ({means}); lower --lr, or check the "
                                 "data and the teacher checkpoint")


class Progress:   # rank 0: a line every `every` s inside an epoch (step, images/s, ETA), read from host clocks only
    def __init__(self, rank, steps, images_per_step, epochs_left=1, every=30.0):
        self.on, self.steps, self.images, self.left, self.every = rank == 0, steps, images_per_step, epochs_left, every
        self.start = self.last = time.time()

    def step(self, done):   # after `done` steps of this epoch
        now = time.time()
        if self.on and now - self.last >= self.every and done < self.steps:
            self.last, rate = now, done / max(now - self.start, 1e-6)
            eta = (self.steps - done) / rate
            print(f"  step {done}/{self.steps}  {rate * self.images:.0f} images/s  epoch ends in {eta / 60:.1f} min, "
                  f"the run in {(eta + (self.left - 1) * self.steps / rate) / 60:.1f} min", flush=True)


def log_record(out_dir, record):
    """Prints one readable line and appends the same fields as one JSON line to <out_dir>/log.jsonl (rank 0 only)."""
    print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in record.items() if not isinstance(v, (list, dict))), flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def write_text(text, path):   # to a temporary name, then renamed: a killed run never leaves a half-written file
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_atomic(obj, path):   # torch.save to a temporary name, then renamed, as write_text
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path, flag):   # torch.load(weights_only=True): tensors and plain data only, a file cannot run code
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} is {'a folder' if os.path.isdir(path) else 'missing'}; pass a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = (f"{type(e).__name__}: {(str(e).strip() or 'empty or cut short').splitlines()[0][:120]}; pass an "
               "intact file of tensors") if "Weights only load failed" not in str(e) else ("it holds Python objects "
               "besides tensors, which could run code; if you trust it, save its state_dict alone with torch.save")
        raise UserError(f"{flag} {path} is not a readable weights-only PyTorch checkpoint ({why})") from None


def load_state_dict(path, flag):
    """The state_dict in a checkpoint of ours, RepDistiller, mdistiller, the official code or torchvision/timm:
    {"model": sd}, {"state_dict": sd}, {"net": sd} or a bare sd, "module." prefixes removed."""
    ckpt = read_checkpoint(path, flag)
    sd = next((ckpt[k] for k in ("model", "state_dict", "net") if isinstance(ckpt, dict)
               and isinstance(ckpt.get(k), dict)), ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{flag} {path} holds no state_dict ('model', 'state_dict', 'net' or bare); pass a model's")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(model, state_dict, what):   # strict, naming the first wrong tensor instead of listing hundreds
    own = model.state_dict()
    for name in [*own, *state_dict]:
        problem = ("is missing from the checkpoint" if name not in state_dict else "is not in the model"
                   if name not in own else None if state_dict[name].shape == own[name].shape else
                   f"has shape {tuple(state_dict[name].shape)} in the checkpoint but {tuple(own[name].shape)} here")
        if problem:
            raise UserError(f"{what}: tensor '{name}' {problem}; check the model name and the number of classes")
    model.load_state_dict(state_dict)


FREE = {"out", "resume", "overwrite", "epochs", "finetune_epochs", "stop_after", "workers", "data_dir", "download",
        "skip_bad_images"}


def make_out(path):   # creates --out (and its parents), or stops with one line
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path} cannot be created ({e.strerror}); pass a folder you can write") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--out {path} is not writable; pass a folder you can write")


def run_info(world_size, device):   # what results.json records about where it ran
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(
        os.path.abspath(__file__))).stdout.strip() if shutil.which("git") else ""
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine(), "world_size": world_size, "git_commit": commit or None}


def open_run(args, rank):
    """--out and --resume -> the checkpoint to continue from, or None. A folder holding a run needs --resume (continue)
    or --overwrite (start afresh); --resume on an empty or new folder starts afresh, so one command serves the first
    launch and every restart. Refuses a resume whose arguments changed (all but FREE); drops stale temporary files,
    log lines after the checkpoint and a cut-off last line. Every rank reads the checkpoint; rank 0 edits the folder."""
    if not args.out or args.resume and args.overwrite:
        if args.resume:
            raise UserError("--resume continues the run in --out; pass --out" if not args.out else
                            "--resume continues the run in --out, --overwrite replaces it: pass one of them")
        return None
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))   # saved with the args: a resume on other processes differs
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; pass a folder (it is created if missing)")
    held = [f for f in ("checkpoint.pt", "log.jsonl", "results.json") if os.path.exists(os.path.join(args.out, f))]
    if held and not (args.resume or args.overwrite):
        raise UserError(f"--out {args.out} holds a run ({', '.join(held)}); pass --resume to continue it, --overwrite "
                        "to start afresh, or another --out")
    path = os.path.join(args.out, "checkpoint.pt")
    ckpt = read_checkpoint(path, "--resume") if args.resume and "checkpoint.pt" in held else None
    if ckpt is not None and not (isinstance(ckpt, dict) and {"args", "epoch"} <= set(ckpt)):
        raise UserError(f"--resume: {path} was not written by this script (no args, epoch); pass another --out")
    if ckpt is not None:
        changed = sorted(k for k in {**ckpt["args"], **vars(args)} if k not in FREE and
                         ckpt["args"].get(k) != vars(args).get(k))
        if changed:
            raise UserError("--resume: the run in --out was started with other " + ", ".join(
                f"{'processes' if k == 'world_size' else '--' + k.replace('_', '-')} ({ckpt['args'].get(k)} there, "
                f"{vars(args).get(k)} now)" for k in changed)
                + "; pass the same ones, or another --out")
    if rank == 0:
        make_out(args.out)
        for name in os.listdir(args.out):
            if ".tmp" in name:   # left by a write that was killed
                os.remove(os.path.join(args.out, name))
        if ckpt is None:
            for name in held:
                os.remove(os.path.join(args.out, name))
            print(f"{args.out}: a fresh run{' (--resume found no checkpoint)' if args.resume else ''}", flush=True)
        else:
            lines = open(os.path.join(args.out, "log.jsonl")).readlines() if "log.jsonl" in held else []
            keep = []
            for line in lines:   # the epochs the checkpoint holds, without a line cut short or garbled by a crash
                try:
                    keep += [line] if line.endswith("\n") and json.loads(line)["epoch"] < ckpt["epoch"] else []
                except (ValueError, KeyError, TypeError):
                    pass
            write_text("".join(keep), os.path.join(args.out, "log.jsonl"))
            print(f"resuming {args.out} after epoch {ckpt['epoch']}", flush=True)
            if ckpt["args"]["epochs"] != args.epochs:
                print(f"warning: --epochs {args.epochs} (was {ckpt['args']['epochs']}): a schedule that depends on it "
                      "follows the new length in the epochs left, unlike a run started with it", flush=True)
    return ckpt
# ---- end shared --------------------------------------------------------------------------------------------------


# ---- models: PreAct ResNet as Sel-CL builds it (key names match the official checkpoints) -----------------------

class AllReduceSum(torch.autograd.Function):    # dist.all_reduce whose gradient is the sum of every process's too
    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        return AllReduceSum.forward(ctx, grad)


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d; under DDP in training mode its statistics are those of the global batch (as SyncBatchNorm, which
    has no CPU kernel), so W processes normalise as one process with W times the batch."""
    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = AllReduceSum.apply(xf.sum((0, 2, 3))) / n   # two passes: no E[x²] − E[x]² cancellation
        var = AllReduceSum.apply((xf - mean[:, None, None]).square().sum((0, 2, 3))) / n
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * (var + self.eps).rsqrt()
        return (xf * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He 2016): BN-ReLU-conv-BN-ReLU-conv; a projection shortcut sees BN-ReLU(x)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = BatchNorm(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        projection = [nn.Conv2d(in_planes, planes, 1, stride, bias=False)] if stride != 1 or in_planes != planes else []
        self.shortcut = nn.Sequential(*projection)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + self.shortcut(out)


class PreActResNet(nn.Module):
    """Stem conv-BN-ReLU, four stages of pre-activation blocks (no final BN), average pool; `linear2` classifies, `head`
    embeds, both in float32 also under autocast. forward(x) → (logits (B, C), unit-norm embedding (B, embed_dim),
    pooled features (B, 8·width))."""

    def __init__(self, num_blocks, num_classes, width=64, embed_dim=128):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = BatchNorm(width)
        in_planes = width
        for i, (blocks, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            planes = width * 2 ** i
            layer = [PreActBlock(in_planes, planes, stride)]
            layer += [PreActBlock(planes, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            in_planes = planes
        self.linear2 = nn.Linear(in_planes, num_classes)
        self.head = nn.Linear(in_planes, embed_dim)
        for m in self.modules():                    # (BatchNorm starts at weight 1, bias 0 by default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        pooled = F.adaptive_avg_pool2d(out.float(), 1).flatten(1)          # (B, 512) float32
        with torch.autocast(x.device.type, enabled=False):  # float32: bf16 logits tie, inflating β = 0.5 (Eq. 2)
            return self.linear2(pooled), F.normalize(self.head(pooled), dim=1), pooled


MODELS = {
    "preact_resnet18": lambda num_classes: PreActResNet([2, 2, 2, 2], num_classes),     # 11,236,938 params at 10 cl.
    "preact_resnet34": lambda num_classes: PreActResNet([3, 4, 6, 3], num_classes),     # 21,345,098 params at 10 cl.
    "preact_resnet18_w8": lambda num_classes: PreActResNet([2, 2, 2, 2], num_classes, width=8, embed_dim=32),  # tests
}


def load_teacher(args, data, device):
    """The frozen teacher (stage two sets its mode: --teacher-mode); random weights without --teacher-ckpt (only
    --benchmark allows that). A checkpoint that holds noisy labels (a stage1_model.pt) must hold the student's."""
    teacher = MODELS[args.teacher](data["num_classes"])
    if args.teacher_ckpt:
        state = read_checkpoint(args.teacher_ckpt, "--teacher-ckpt")
        labels = state.get("noisy_labels") if isinstance(state, dict) else None
        if labels is not None and not args.benchmark and not (isinstance(labels, torch.Tensor) and
                                                               torch.equal(labels, data["noisy_y"].cpu())):
            raise UserError(f"--teacher-ckpt {args.teacher_ckpt} was trained on other noisy labels than this run's; "
                            "pass the teacher run's noisy_labels.npy with --noisy-labels, or that run's checkpoint")
        load_weights(teacher, load_state_dict(args.teacher_ckpt, "--teacher-ckpt"),
                     f"--teacher-ckpt {args.teacher_ckpt}")
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return teacher.to(device, memory_format=layout).requires_grad_(False)


# ---- data: CIFAR pickles held on the device as uint8, augmented there in batches; label noise --------------------

MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),      # as the official Sel-CL code
            "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
            "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}
CIFAR10_ASYM = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}   # truck→automobile, bird→airplane, deer→horse, cat↔dog


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        d["data"] = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    except Exception as e:
        raise UserError(f"{path} is not a CIFAR python pickle ({type(e).__name__}: {e}); re-download the data set")
    return d


def load_cifar(data_dir, dataset):
    """dict with train_x/test_x (N, 3, 32, 32) uint8, train_y/test_y (N,) int64, coarse (N,) or None, num_classes."""
    ten = dataset == "cifar10"
    folder = os.path.join(data_dir, "cifar-10-batches-py" if ten else "cifar-100-python")
    if not os.path.isdir(folder):
        raise UserError(f"{folder} not found; pass --data-dir with the folder that holds "
                        f"{os.path.basename(folder)}/ (CIFAR's python version, as torchvision downloads it)")
    parts = [_unpickle(os.path.join(folder, name))
             for name in ([f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"])]
    test = _unpickle(os.path.join(folder, "test_batch" if ten else "test"))
    key = "labels" if ten else "fine_labels"
    return {"train_x": np.concatenate([p["data"] for p in parts]),
            "train_y": np.concatenate([p[key] for p in parts]).astype(np.int64),
            "test_x": test["data"], "test_y": np.asarray(test[key], dtype=np.int64),
            "coarse": None if ten else np.asarray(parts[0]["coarse_labels"], dtype=np.int64),
            "num_classes": 10 if ten else 100}


def synthetic_data(num_classes=4, n_train=128, n_test=63, size=16, seed=0):
    """A small learnable stand-in for CIFAR (--dataset synthetic): each class has its own colour and stripe frequency,
    plus pixel noise. The odd test count makes a 2-process evaluation split unevenly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]

    def make(n):
        labels = rng.permutation(np.arange(n) % num_classes)
        colour = np.stack([(97 * labels) % 256, (53 * labels + 80) % 256, (181 * labels + 40) % 256], 1)
        freq = 0.3 + 0.2 * labels[:, None, None]
        stripes = np.sin(np.where(labels[:, None, None] % 2 == 1, xx, yy) * freq) * 50      # (n, size, size)
        img = colour[:, :, None, None] + stripes[:, None] + rng.normal(0, 30, size=(n, 3, size, size))
        return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)

    (train_x, train_y), (test_x, test_y) = make(n_train), make(n_test)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, coarse=None, num_classes=num_classes)


def asymmetric_class_map(dataset, num_classes, fine_labels=None, coarse_labels=None):
    """(C,) array: the class every flipped label of class c becomes (Sel-CL's asymmetric noise)."""
    class_map = np.arange(num_classes)
    if dataset == "cifar10":
        class_map[list(CIFAR10_ASYM)] = list(CIFAR10_ASYM.values())
    elif dataset == "cifar100":         # in each superclass its 5 fine classes, sorted, map j → j+1 circularly
        for superclass in np.unique(coarse_labels):
            fine = np.unique(fine_labels[coarse_labels == superclass])                 # sorted
            class_map[fine] = np.roll(fine, -1)
    else:
        class_map = (class_map + 1) % num_classes       # synthetic data: every class to the next one
    return class_map


def make_noisy_labels(true_labels, num_classes, noise_type, rate, seed, class_map=None):
    """Seeded noisy copy of `true_labels`. symmetric: exactly round(rate·N) samples, chosen without replacement, get
    a label drawn uniformly from all C classes (their true class included); asymmetric: each sample independently
    flips to class_map[y] with probability `rate`."""
    rng = np.random.default_rng(seed)
    noisy = true_labels.copy()
    if noise_type == "symmetric":
        picked = rng.choice(len(true_labels), size=int(round(rate * len(true_labels))), replace=False)
        noisy[picked] = rng.integers(0, num_classes, size=len(picked))
    elif noise_type == "asymmetric":
        flip = rng.random(len(true_labels)) < rate
        noisy[flip] = class_map[true_labels[flip]]
    return noisy                                    # noise_type "none": the true labels


def noise_report(true_labels, noisy_labels, num_classes):
    """Realised noise rate and the (C, C) transition matrix T[i, j] = fraction of class-i samples labelled j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (true_labels, noisy_labels), 1)
    matrix = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return {"noise_rate": float((true_labels != noisy_labels).mean()), "transition_matrix": matrix.round(5).tolist()}


def load_noisy_labels(path, true_labels, num_classes):
    try:
        noisy = np.load(path)                       # the teacher run's noisy_labels.npy (allow_pickle=False)
    except Exception as e:
        raise UserError(f"--noisy-labels {path} is not a readable .npy ({type(e).__name__}: {e}); pass the "
                        "noisy_labels.npy of a noisy.py run") from None
    if noisy.shape != true_labels.shape or not np.issubdtype(noisy.dtype, np.integer) \
            or noisy.min() < 0 or noisy.max() >= num_classes:
        raise UserError(f"--noisy-labels {path} holds {noisy.shape} {noisy.dtype} labels, but this training set needs "
                        f"{true_labels.shape} integers in [0, {num_classes}); was it written for another data set?")
    return noisy.astype(np.int64)


def augment(x, gen):
    """Pad-4 random crop + horizontal flip of a uint8 batch (B, 3, H, W), drawn on its device (no host copy)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    oy, ox = (torch.randint(0, 9, (b,), generator=gen, device=x.device) for _ in range(2))
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]            # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]            # (B, 1, 1, W)
    out = padded[torch.arange(b, device=x.device)[:, None, None, None],
                 torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(b, generator=gen, device=x.device) < 0.5)[:, None, None, None]
    return torch.where(flip, out.flip(3), out)


def resized_crop(x, top, left, height, width, flip):
    """RandomResizedCrop's crop (top, left, height, width (B,) pixels) of a uint8 batch (B, 3, H, W), resized back to
    H x W bilinearly (half-pixel centres, edges clamped, as PIL and torchvision upscale), mirrored where flip (B,) bool.
    Returns float (B, 3, H, W) in [0, 255]."""
    out = x.float()
    for dim, (first, extent) in ((2, (top, height)), (3, (left, width))):     # rows, then columns (separable)
        size = out.shape[dim]
        pos = ((torch.arange(size, device=x.device) + 0.5) * extent[:, None] / size - 0.5)
        pos = first[:, None] + torch.minimum(pos.clamp_min(0), extent[:, None] - 1)           # (B, size) source
        if dim == 3:
            pos = torch.where(flip[:, None], pos.flip(1), pos)
        shape = [-1, 1, 1, 1]
        shape[dim] = size
        lo = pos.floor().long()
        take = lambda i: out.gather(dim, i.view(shape).expand(out.shape))
        low = take(lo)
        out = low + (take((lo + 1).clamp_max(size - 1)) - low) * (pos - lo).view(shape)
    return out


GRAY = (0.299, 0.587, 0.114)        # PIL's convert("L")


def colour_op(x, op, factor):
    """ColorJitter's op on float images (B, 3, H, W) in [0, 255], per-image factor (B,): 0 brightness, 1 contrast,
    2 saturation (blends with black, the mean grey level, the grey image), 3 hue (shift in turns, via HSV)."""
    f = factor.view(-1, 1, 1, 1)
    gray = sum(w * c for w, c in zip(GRAY, x.unbind(1)))[:, None]                        # (B, 1, H, W)
    if op < 3:
        base = 0.0 if op == 0 else gray.mean((2, 3), keepdim=True) if op == 1 else gray
        return (base + f * (x - base)).clamp(0, 255)
    value, arg = x.max(1, keepdim=True)
    delta = value - x.min(1, keepdim=True).values
    r, g, b = x.unbind(1)
    d = delta[:, 0].clamp_min(1e-6)
    hue = torch.where(arg[:, 0] == 0, ((g - b) / d) % 6, torch.where(arg[:, 0] == 1, (b - r) / d + 2, (r - g) / d + 4))
    hue = (hue[:, None] + 6 * f) % 6                                                     # (B, 1, H, W) in [0, 6)
    k = (5 - 2 * torch.arange(3, device=x.device).view(1, 3, 1, 1) + hue) % 6             # R, G, B
    return value - delta * torch.minimum(k, 4 - k).clamp(0, 1)           # value · saturation = delta


def complex_augment(x, gen):
    """Sel-CL's "complex" augmentation of a uint8 batch (B, 3, H, W), each image its own draws (torchvision's):
    RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, 10 tries, else the whole image), flip, ColorJitter(0.4, 0.4, 0.4,
    0.1) with p 0.8 (its four ops in a random order), grayscale with p 0.2. Returns float (B, 3, H, W) in [0, 255]."""
    b, _, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=gen, device=x.device)
    area = h * w * (0.08 + 0.92 * u(b, 10))
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u(b, 10))
    cw, ch = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    fits = (cw <= w) & (ch <= h)
    first = fits.float().argmax(1, keepdim=True)                                 # the first try that fits
    cw, ch = (torch.where(fits.any(1), t.gather(1, first)[:, 0], full) for t, full in ((cw, w), (ch, h)))
    top, left = (u(b) * (h - ch + 1)).floor(), (u(b) * (w - cw + 1)).floor()
    out = resized_crop(x, top, left, ch, cw, u(b) < 0.5)
    jitter, factors, order = u(b) < 0.8, torch.cat([0.6 + 0.8 * u(3, b), 0.2 * u(1, b) - 0.1]), u(b, 4).argsort(1)
    for step in range(4):
        for op in range(4):
            out = torch.where((jitter & (order[:, step] == op)).view(-1, 1, 1, 1), colour_op(out, op, factors[op]),
                              out)
    gray = sum(w * c for w, c in zip(GRAY, out.unbind(1)))[:, None]
    return torch.where((u(b) < 0.2).view(-1, 1, 1, 1), gray.expand_as(out), out)


def mixup(x, alpha, gen, np_rng):
    """Sel-CL's mix_data_lab: (λ·x + (1 − λ)·x[perm], perm, λ), λ ~ Beta(α, α) folded to ≥ 0.5 (1 if α = 0)."""
    lam = float(np_rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(len(x), generator=gen, device=x.device)
    return lam * x + (1.0 - lam) * x[perm], perm, lam


def mixup_ce(logits, targets, perm, lam):
    """(B,) λ·CE(s, y) + (1 − λ)·CE(s, y[perm])."""
    return lam * F.cross_entropy(logits, targets, reduction="none") + \
        (1 - lam) * F.cross_entropy(logits, targets[perm], reduction="none")


# ---- Sel-CL: confident examples, confident pairs, the selective supervised contrastive loss ----------------------

@torch.no_grad()
def knn_vote(embed, labels, num_classes, k, chunk=1024):
    """(N, C): fraction of each sample's k nearest neighbours (cosine similarity, itself excluded) per label."""
    votes = torch.zeros(len(embed), num_classes, device=embed.device)
    for start in range(0, len(embed), chunk):
        sim = embed[start:start + chunk] @ embed.T                                     # (b, N)
        own = torch.arange(sim.shape[0], device=embed.device)
        sim[own, start + own] = -float("inf")                                          # not its own neighbour
        neighbours = sim.topk(k, dim=1).indices                                        # (b, k)
        votes[start:start + chunk].scatter_add_(1, labels[neighbours], torch.ones_like(neighbours, dtype=torch.float))
    return votes / k


@torch.no_grad()
def select_confident(embed, noisy_labels, num_classes, k=250, select_quantile=0.5, pair_quantile=0.25):
    """Sel-CL's selection (Li 2022, Sec. 3.2; official `pair_selection`). embed (N, D) unit-norm, noisy_labels (N,).
    The k neighbours vote with their noisy labels (→ corrected labels), then with the corrected ones: a sample agrees
    when that winner is its noisy label; discrepancy −log p(noisy label), p clamped to [0.01, 0.99]. Each class keeps,
    lowest discrepancy first, the `select_quantile` quantile of the per-class agreeing counts. Returns (selected (N,)
    bool, threshold = the `pair_quantile` quantile of confident same-label pairs' similarities; see pair_mask)."""
    k = min(k, len(embed) - 1)
    corrected = knn_vote(embed, noisy_labels, num_classes, k).argmax(1)
    votes = knn_vote(embed, corrected, num_classes, k)
    discrepancy = -votes.gather(1, noisy_labels[:, None]).squeeze(1).clamp(0.01, 0.99).log()
    agrees = votes.argmax(1) == noisy_labels
    per_class = torch.bincount(noisy_labels[agrees], minlength=num_classes).float().cpu()
    # 0.5: torch.median as in the official code, the lower middle value
    budget = per_class.median() if select_quantile == 0.5 else torch.quantile(per_class, select_quantile)
    selected = torch.zeros(len(embed), dtype=torch.bool, device=embed.device)
    for c in range(num_classes):
        members = (noisy_labels == c).nonzero().squeeze(1)
        order = torch.argsort(discrepancy[members], stable=True)
        selected[members[order[:int(min(budget.item(), len(members)))]]] = True
    # quantile of the similarities of confident same-label pairs (self-pairs included, as in the official code)
    bins = 20001                                    # bins of width 1e-4 over [−1, 1]
    hist = torch.zeros(bins, dtype=torch.float64, device=embed.device)
    for c in range(num_classes):
        z = embed[selected & (noisy_labels == c)]
        if len(z):
            hist += torch.histc((z @ z.T).clamp(-1, 1).flatten().float(), bins, -1, 1).double()
    cdf = hist.cumsum(0) / hist.sum().clamp_min(1)
    first = int(torch.searchsorted(cdf, torch.tensor([pair_quantile], dtype=torch.float64, device=cdf.device),
                                   right=True).clamp_max(bins - 1))
    threshold = -1.0 + 2.0 * first / bins            # left edge of the bin that holds the quantile
    return selected, threshold


@torch.no_grad()
def reselect(args, raw_model, data, rank, world_size):
    """select_confident on every training image's embedding, in float32, unaugmented, eval-mode BN with rank 0's
    statistics (each process embeds rows rank::world_size). Returns {"selected" (N,) bool, "threshold", "embed" (N, D)
    unit-norm, "pairs": the number of confident pairs (i, j), i ≠ j}."""
    x = data["train_x"]
    broadcast_buffers(raw_model)
    raw_model.eval()
    rows = torch.arange(rank, len(x), world_size, device=x.device)
    embed = torch.zeros(len(x), raw_model.head.out_features, device=x.device)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):     # float32, as on the CPU
        for chunk in rows.split(500):
            embed[chunk] = raw_model(data["normalize"](x[chunk]))[1]
    embed = F.normalize(all_reduce_sum(embed), dim=1)
    selected, threshold = select_confident(embed, data["noisy_y"], data["num_classes"], args.knn_k,
                                           args.select_quantile, args.pair_quantile)
    if world_size > 1:          # identical on every process by construction; rank 0's result makes sure
        shared = torch.cat([selected.float(), torch.tensor([threshold], device=x.device)])
        dist.broadcast(shared, 0)
        selected, threshold = shared[:-1].bool(), shared[-1].item()
    selection, rows = {"selected": selected, "threshold": threshold, "embed": embed}, torch.arange(len(x), device=x.device)
    selection["pairs"] = int(sum(pair_mask(selection, data["noisy_y"], part, rows).sum() for part in rows.split(1024))
                             - len(x))
    return selection


def pair_mask(selection, noisy_labels, rows, cols):
    """(R, M) bool confident pairs of the samples `rows` (R,) with `cols` (M,): same noisy label, and either both
    confident or similar enough (stored embeddings) — the official graph, built per batch."""
    z, labels, sel = selection["embed"], noisy_labels, selection["selected"]
    same = labels[rows][:, None] == labels[cols][None, :]
    return same & ((z[rows] @ z[cols].T >= selection["threshold"]) | (sel[rows][:, None] & sel[cols][None, :]))


# Sel-CL's stage-one constants (official run scripts): MoCo queue and temperatures, EMA momentum, supervised queue of
# QUEUE_PER_CLASS·C·2 entries used from epoch index SUP_QUEUE_FROM (official `epoch > 3`, counted from 1), λ_s and clip
MOCO_QUEUE, TEMPERATURE, EMA_MOMENTUM, QUEUE_PER_CLASS, SUP_QUEUE_FROM, LAMBDA_S, SIMI_CLIP = \
    10_000, 0.1, 0.999, 100, 3, 0.01, 0.25


def selcl_masks(pairs, slot, perms, valid):
    """The MOIT-style masks of Sel-CL (official supervised/unsupervised_masks_estimation) of 2N anchors (view A then
    view B of the batch's N images, each view mixed with perms[v]) against M columns. pairs (N, M) bool: each image's
    confident pairs with each column's image; slot (M,): the column's place in this batch's 2N (view A then B; the
    supervised queue holds them once enqueued) or −1; valid (M,) bool. Returns bool (2N, M): sup (confident
    partners, the same image excluded), unsup (the same image's other view), sup2 / unsup2 (the same for the mixed-in
    image, the anchor's own column excluded; its own image counts in both, as in the official code), keep (all
    valid columns but the anchor itself)."""
    n = len(pairs)
    rows = torch.arange(2 * n, device=pairs.device)
    own, mixed = rows % n, torch.cat(perms)
    keep = (slot[None, :] != rows[:, None]) & valid
    in_batch = slot[None, :] >= 0
    same, same2 = in_batch & (slot % n == own[:, None]), in_batch & (slot % n == mixed[:, None])
    return pairs[own] & ~same & valid, same & keep, pairs[mixed] & keep, same2 & keep, keep


def supcon_loss(sim, masks, lams):
    """Sel-CL's supervised contrastive loss (Eq. 6; official Supervised_ContrastiveLearning_loss) of 2N anchors against
    M columns: sim (2N, M) cosine similarities, masks from selcl_masks, lams (λ_A, λ_B). An anchor's loss is λ·(mean
    log-probability of its positives, sup + unsup) + (1 − λ)·(that of the mixed-in image's), negated and averaged over
    the views; anchors without a confident partner (view A's sup row empty) count zero in the mean over N."""
    sup, unsup, sup2, unsup2, keep = masks
    n, logits = len(sim) // 2, sim.float() / TEMPERATURE
    log_prob = logits - torch.logsumexp(logits.masked_fill(~keep, -float("inf")), 1, keepdim=True)
    lam = torch.cat([logits.new_full((n,), lams[0]), logits.new_full((n,), lams[1])])

    def mean_log_prob(a, b):
        weight = a.float() + b.float()
        return (weight * log_prob).sum(1) / weight.sum(1)
    loss = -(lam * mean_log_prob(sup, unsup) + (1 - lam) * mean_log_prob(sup2, unsup2))
    return (loss.view(2, n).mean(0) * sup[:n].any(1)).mean()


def similarity_loss(prob_sim, masks, lams, columns):
    """Sel-CL's prediction-similarity loss (official Simi_loss): binary cross-entropy of prob_sim (2N, M), the inner
    products of softmax predictions, against the positive masks, λ-weighted as supcon_loss; mean over 2N × `columns`
    (the valid ones)."""
    sup, unsup, sup2, unsup2, keep = masks
    n, prob_sim = len(prob_sim) // 2, prob_sim.clamp(0, 1)           # (empty queue entries hold −1)
    lam = torch.cat([prob_sim.new_full((n, 1), lams[0]), prob_sim.new_full((n, 1), lams[1])])

    def bce(a, b):
        target = a.float() + b.float()
        return -(target * (prob_sim + 1e-7).log() + (1 - target) * (1 - prob_sim + 1e-7).log()) * keep
    return (lam * bce(sup, unsup) + (1 - lam) * bce(sup2, unsup2)).sum() / (2 * n * columns)


def moco_loss(q, k, keys):
    """(N,) instance-contrast loss (official MemoryMoCo + NCESoftmaxLoss): each query q (N, D) against its key k and
    the queued keys (K, D), temperature 0.1."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ keys.T], 1).float() / TEMPERATURE
    return torch.logsumexp(logits, 1) - logits[:, 0]


def selcl_memory(args, raw_model, num_classes, device, state=None):
    """Sel-CL's state besides the model: the EMA key encoder ("ema", a copy of the model), the MoCo queue ("keys",
    10,000 × D, random at first as in MemoryMoCo) and the supervised queue of QUEUE_PER_CLASS·C·2 EMA embeddings
    ("feats"), EMA predictions ("pros") and dataset indices ("index", −1: empty), with their write pointers. `state`:
    a checkpoint's (end_epoch's) to resume from."""
    d, k = raw_model.head.out_features, QUEUE_PER_CLASS * num_classes * 2
    batch = args.batch_size * (dist.get_world_size() if dist.is_initialized() else 1)
    if 2 * batch > min(k, MOCO_QUEUE):   # a step enqueues 2 entries per image (official sizes; upstream breaks too)
        raise UserError(f"--batch-size: the global batch {batch} does not fit Sel-CL's queues ({min(k, MOCO_QUEUE)} "
                        f"entries, 2 per image); use a global batch of at most {min(k, MOCO_QUEUE) // 2}")
    stdv = 1 / math.sqrt(d / 3)
    memory = {"ema": copy.deepcopy(raw_model).requires_grad_(False), "keys_ptr": 0, "ptr": 0,
              "keys": ((torch.rand(MOCO_QUEUE, d, generator=seeded("moco", args.seed)) * 2 - 1) * stdv).to(device),
              "feats": -torch.ones(k, d, device=device), "pros": -torch.ones(k, num_classes, device=device),
              "index": -torch.ones(k, dtype=torch.long, device=device)}
    if state is not None:
        memory["ema"].load_state_dict(state["ema"])
        memory.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items() if k != "ema"})
    return memory


def enqueue(memory, feats, pros, index):
    """The official queue_with_pro.enqueue_dequeue: the 2N entries at the pointer, or, when they do not fit, into the
    last 2N slots (the pointer back to 0). Returns where they went."""
    size, n, ptr = len(memory["index"]), len(index), memory["ptr"]
    start, memory["ptr"] = (ptr, ptr + n) if ptr + n <= size else (size - n, 0)
    for name, value in (("feats", feats), ("pros", pros), ("index", index)):
        memory[name][start:start + n] = value
    return start


@torch.no_grad()
def ema_update(ema, model, momentum=EMA_MOMENTUM):   # official moment_update: parameters only, not BatchNorm's buffers
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - momentum)


def gather(t):
    """(W·B, ...): t (B, ...) of every process in rank order; the gradient flows into this process's own slice."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def sum_over_processes(tensors):    # in place: the gradient of a loss that every process computes over the global batch
    if dist.is_initialized() and tensors:
        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


def load_data(args, rank, world_size, device):
    """On `device`: train_x (N, 3, H, W) uint8, noisy_y (N,), clean (N,) bool (noisy == true; for logs), test_x, test_y,
    num_classes, noise (rate, transition matrix), normalize (uint8 → float). --benchmark: CIFAR-shaped fakes."""
    if args.benchmark:
        num_classes = {"cifar10": 10, "cifar100": 100, "synthetic": 4}[args.dataset]
        raw = synthetic_data(num_classes, args.batch_size * world_size * max(5, args.benchmark), 64, size=32)
        noisy = raw["train_y"]
    else:
        raw = synthetic_data() if args.dataset == "synthetic" else load_cifar(args.data_dir, args.dataset)
        true, num_classes = raw["train_y"], raw["num_classes"]
        if args.noisy_labels:
            noisy = load_noisy_labels(args.noisy_labels, true, num_classes)
        else:
            class_map = asymmetric_class_map(args.dataset, num_classes, true, raw["coarse"])
            noisy = make_noisy_labels(true, num_classes, args.noise_type, args.noise_rate, args.noise_seed, class_map)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in MEAN_STD[args.dataset])
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return {"train_x": torch.from_numpy(raw["train_x"]).to(device), "noisy_y": torch.from_numpy(noisy).to(device),
            "clean": torch.from_numpy(noisy == raw["train_y"]).to(device),
            "test_x": torch.from_numpy(raw["test_x"]).to(device), "test_y": torch.from_numpy(raw["test_y"]).to(device),
            "num_classes": num_classes, "noise": noise_report(raw["train_y"], noisy, num_classes),
            "normalize": lambda x: ((x.float() - mean) / std).contiguous(memory_format=layout)}


def loss_terms(args, epoch, student_out, teacher_out, labels):
    """Stage two's {term: scalar}, summed into the loss. student_out, teacher_out (None for ce): (logits (B, C), embed,
    pooled (B, F)); labels: (y (B,), perm, λ, bootstrap targets (B,) or None) of the mixup λ·x + (1 − λ)·x[perm]."""
    logits, _, feat = student_out
    y, perm, lam, boot = labels
    ce = mixup_ce(logits.float(), y, perm, lam)
    if boot is not None:                            # bootstrapping (official criterionMixBoot, B = 0.2)
        ce = 0.8 * ce + 0.2 * mixup_ce(logits.float(), boot, perm, lam)
    terms = {"gt": args.gt_weight * ce.mean()}
    if args.loss == "kd":
        terms["kd"] = args.kd_weight * kd_loss(logits, teacher_out[0], T=args.kd_T)
    elif args.loss == "rkd":
        terms["rkd"] = args.kd_weight * rkd_loss(feat, teacher_out[2])
    elif args.loss == "augconf":                    # Eq. 1, α ramps to --alpha-max over the first 30% of stage two
        alpha = augconf_alpha(epoch - args.epochs, args.finetune_epochs, args.alpha_max)
        terms["augconf"] = args.kd_weight * augconf_loss(logits, teacher_out[0], alpha, T=args.kd_T)
    elif args.loss == "adaptconf":                  # Eq. 2, β ramped over the first 25% of stage two
        scale = adaptconf_beta_scale(epoch - args.epochs, args.finetune_epochs)
        terms["adaptconf"] = args.kd_weight * adaptconf_loss(logits, teacher_out[0], tau=args.tau, T=args.kd_T,
                                                             beta_scale=scale)
    elif args.loss != "ce":
        raise ValueError(f"unknown loss '{args.loss}'")
    return terms


def adaptconf_beta_scale(stage_epoch, stage_epochs):
    """β's warm-up in the official noisy-label code (epochs counted from 1, the total passed as epochs + 1)."""
    e, total = stage_epoch + 1, stage_epochs + 1
    return e / (0.25 * total) if e < int(0.25 * total) else 1.0


def lr_at(args, epoch, step, steps_per_epoch):
    """Stage one: linear warm-up from lr/100 over --warmup-epochs (per step), then ×0.1 at each milestone.
    Stage two (epoch ≥ --epochs): the constant --finetune-lr."""
    if epoch >= args.epochs:
        return args.finetune_lr
    it, warm = epoch * steps_per_epoch + step, args.warmup_epochs * steps_per_epoch
    if it < warm:
        return args.lr / 100 * (99 * it / warm + 1)
    return args.lr * 0.1 ** sum(epoch >= m for m in args.milestones)


def selcl_step(args, raw_model, memory, data, selection, confident, index, epoch, gen, np_rng, use_amp, rank,
               world_size):
    """Stage one's losses on the global batch `index` (N,), in the official order (train_uns in the warm-up epoch,
    where `selection` is None; train_sel after); this process forwards its slice, the losses are the global batch's.
    Returns ({term: scalar}, summed into the loss; the similarity loss (own backward) or None; partners per anchor)."""
    n, normalize, ema, labels = len(index), data["normalize"], memory["ema"], data["noisy_y"]
    mine = slice(rank * n // world_size, (rank + 1) * n // world_size)
    autocast = lambda: torch.autocast(index.device.type, dtype=torch.bfloat16, enabled=use_amp)
    both = lambda a, b: torch.cat([gather(a), gather(b)])                    # (2N, ...): view A, then view B
    x = complex_augment(data["train_x"][index.repeat(2)], gen)              # two independent views
    x1, x2 = normalize(x[:n]), normalize(x[n:])
    with autocast():                                # 1: query (view 1) against the EMA key (view 2) and the MoCo queue
        q = gather(raw_model(x1[mine])[1])
        with torch.no_grad():
            k = gather(ema(x2[mine])[1])
    instance = moco_loss(q, k, memory["keys"])                                  # (N,)
    memory["keys"] = memory["keys"].index_copy(0, (torch.arange(n, device=k.device) + memory["keys_ptr"]) % MOCO_QUEUE,
                                               k.float())     # a new tensor: the loss's backward needs the old one
    memory["keys_ptr"] = (memory["keys_ptr"] + n) % MOCO_QUEUE
    (xa, perm_a, lam_a), (xb, perm_b, lam_b) = mixup(x1, 1.0, gen, np_rng), mixup(x2, 1.0, gen, np_rng)
    with autocast():                                # 2: both mixed views through the model and the EMA encoder
        if selection is not None:
            (logits_a, embed_a, _), (logits_b, embed_b, _) = raw_model(xa[mine]), raw_model(xb[mine])
        with torch.no_grad():
            (ema_la, ema_a, _), (ema_lb, ema_b, _) = ema(xa[mine]), ema(xb[mine])
    slot = enqueue(memory, both(ema_a, ema_b).float(), both(ema_la.softmax(1), ema_lb.softmax(1)), index.repeat(2))
    if selection is None:
        return {"instance": instance.mean()}, None, None
    embed, prob = both(embed_a, embed_b).float(), both(logits_a.softmax(1), logits_b.softmax(1))
    perms, lams, columns = (perm_a, perm_b), (lam_a, lam_b), torch.arange(2 * n, device=index.device)
    masks = selcl_masks(pair_mask(selection, labels, index, index.repeat(2)), columns, perms, columns >= 0)
    supervised, similarity = supcon_loss(embed @ embed.T, masks, lams), similarity_loss(prob @ prob.T, masks, lams, 2 * n)
    partners = masks[0][:n].sum(1)                  # confident partners of each image in the batch (and the memory)
    if epoch >= SUP_QUEUE_FROM:                     # 3: the same against the supervised queue (this batch included)
        stored, valid = memory["index"].clamp_min(0), memory["index"] >= 0
        place = torch.arange(len(stored), device=index.device) - slot
        masks = selcl_masks(pair_mask(selection, labels, index, stored), torch.where(place < 2 * n, place, -1), perms,
                            valid)
        supervised = supervised + supcon_loss(embed @ memory["feats"].T, masks, lams)
        similarity = similarity + similarity_loss(prob @ memory["pros"].T, masks, lams, valid.sum())
        partners = partners + masks[0][:n].sum(1)
    terms = {"instance": ((partners < (2 if epoch >= SUP_QUEUE_FROM else 1)) * instance).mean(),  # MoCo if alone
             "supervised": supervised}
    if len(confident):                              # 4: mixup CE on N confident examples drawn with replacement
        pick = confident[torch.randint(0, len(confident), (n,), generator=gen, device=index.device)]
        xs = complex_augment(data["train_x"][pick.repeat(2)], gen)
        (s1, perm1, lam1), (s2, perm2, lam2) = (mixup(normalize(v), 1.0, gen, np_rng) for v in (xs[:n], xs[n:]))
        with autocast():
            logits = both(raw_model(s1[mine])[0], raw_model(s2[mine])[0]).float()
        terms["classif"] = torch.cat([mixup_ce(logits[:n], labels[pick], perm1, lam1),     # weight 1 (lambda_c)
                                      mixup_ce(logits[n:], labels[pick], perm2, lam2)]).mean()
    return terms, similarity, partners.float().mean()


def train_one_epoch(args, stage, model, raw_model, teacher, optimizer, data, selection, epoch, rank, world_size,
                    max_steps=None, memory=None):
    """One epoch of stage one (Sel-CL on all training images; `memory`: selcl_memory, fresh when None; the raw model,
    gradients summed over processes) or two (Sel-CL+ on the confident examples, `model` under DDP). Returns {lr, loss,
    loss_<term>, partners (stage one), train_beta_* (adaptconf), images_per_s}, means over all processes."""
    model.train()
    start, device = time.time(), data["train_x"].device
    use_amp = args.amp and device.type == "cuda"
    # stage one: every process draws the same numbers for the global batch (the contrast sees all of it); two: its own
    stream = (args.seed, epoch) + ((rank,) if stage == 2 else ())
    gen = seeded("augment", *stream, device=device)                                  # crops, colours, permutations
    np_rng = np.random.default_rng(seeded("mixup", *stream).initial_seed())         # mixup's λ
    confident = None if selection is None else selection["selected"].nonzero().squeeze(1)     # (S,)
    pool = torch.arange(len(data["train_x"]), device=device) if stage == 1 else confident
    # a per-epoch permutation of the pool in whole global batches; process r takes columns r·B .. (r + 1)·B − 1
    steps_per_epoch, size = len(pool) // world_size // args.batch_size, args.batch_size * world_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(pool)} {'training images' if stage == 1 else 'confident examples of stage one'} over "
                        f"{world_size} process(es) do not fill one batch of {args.batch_size}; lower --batch-size")
    order = torch.randperm(len(pool), generator=seeded("shuffle", args.seed, epoch))
    batches = pool[order[:steps_per_epoch * size].to(device)].view(steps_per_epoch, size)[:max_steps]
    if stage == 1:
        memory = memory or selcl_memory(args, raw_model, data["num_classes"], device)
        memory["ema"].train()                       # BatchNorm on batch statistics (official set_bn_train)
        params = list(raw_model.parameters())
    elif teacher is not None:                       # the official code leaves the teacher in train mode
        teacher.train(args.teacher_mode == "train")
    sums, beta = {}, torch.zeros(13, device=device)        # loss terms and β statistics, summed on the device
    progress = Progress(rank, len(batches), args.batch_size * world_size,
                        max(1, args.epochs + args.finetune_epochs - epoch))     # epochs of both stages left
    for step, index in enumerate(batches):
        lr = lr_at(args, epoch, step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if stage == 1:
            terms, similarity, partners = selcl_step(args, raw_model, memory, data, selection, confident, index, epoch,
                                                     gen, np_rng, use_amp, rank, world_size)
            extra = {} if similarity is None else {"loss_similarity": similarity, "partners": partners}
        else:                                       # Sel-CL+ on confident examples: mixup CE + the teacher's term
            index, similarity, extra = index[rank * args.batch_size:(rank + 1) * args.batch_size], None, {}
            x = data["train_x"][index]
            x, x_clean = data["normalize"](augment(x, gen)), data["normalize"](x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                x, perm, lam = mixup(x, 1.0, gen, np_rng)
                with torch.no_grad():               # bootstrapping: the model's own prediction on the clean image
                    boot = (raw_model(x_clean)[0].argmax(1) if epoch - args.epochs >= args.label_correction_epoch
                            else None)
                student_out = model(x)
                with torch.no_grad():               # the teacher sees the same mixed image
                    teacher_out = None if teacher is None else teacher(x)
                terms = loss_terms(args, epoch, student_out, teacher_out, (data["noisy_y"][index], perm, lam, boot))
            if args.loss == "adaptconf":            # Figure 3: β of the training batches (unscaled)
                beta += beta_counts(adaptconf_beta(student_out[0], teacher_out[0], tau=args.tau))
        loss = sum(terms.values())
        if stage == 2 and world_size > 1:   # the untrained head gets a zero gradient: no parameter is unused, so
            loss = loss + 0.0 * student_out[1].sum()     # DDP skips a blocking read of its used-parameter map
        optimizer.zero_grad(set_to_none=True)
        if similarity is not None:                  # λ_s·L_sim: its own backward, its gradient clipped to norm 0.25
            clipped = [torch.zeros_like(p) if g is None else g for p, g in zip(params, torch.autograd.grad(
                LAMBDA_S * similarity, params, retain_graph=True, allow_unused=True))]
            sum_over_processes(clipped)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
            torch._foreach_mul_(clipped, (SIMI_CLIP / (norm + 1e-6)).clamp(max=1.0))
        loss.backward()
        if stage == 1:                              # every process computed the global loss: sum the gradients
            sum_over_processes([p.grad for p in params if p.grad is not None])
            for p, g in zip(params, clipped if similarity is not None else []):
                p.grad = g if p.grad is None else p.grad.add_(g)
        optimizer.step()
        if stage == 1:
            ema_update(memory["ema"], raw_model)
        progress.step(step + 1)
        for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}, **extra}.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
    totals = all_reduce_sum(torch.cat([torch.stack(list(sums.values())), beta]))
    means = dict(zip(sums, (totals[:len(sums)] / (len(batches) * world_size)).tolist()))
    check_finite(means, epoch)
    if stage == 2 and args.loss == "adaptconf":
        means.update(beta_summary(totals[len(sums):], "train_beta"))
    return {"lr": lr, **means, "images_per_s": len(batches) * args.batch_size * world_size / (time.time() - start)}


@torch.no_grad()
def evaluate(args, raw_model, data, rank, world_size):
    """{top1, top5 (percent), images}, in float32 without TF32 (bf16 logits swap the top class for ~1% of images; so
    GPU and CPU agree): each process scores test rows rank::world_size, the counts are summed, so every image counts
    once. Leaves eval mode on."""
    broadcast_buffers(raw_model)   # every process scores its shard with rank 0's BatchNorm statistics
    raw_model.eval()
    rows = torch.arange(rank, len(data["test_y"]), world_size, device=data["test_y"].device)
    counts = torch.zeros(3, device=rows.device)                 # top-1 hits, top-5 hits, images
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):     # float32, as on the CPU
        for chunk in rows.split(500):
            logits = raw_model(data["normalize"](data["test_x"][chunk]))[0]
            counts[:2] += topk_correct(logits, data["test_y"][chunk], (1, 5))
            counts[2] += len(chunk)
    top1, top5, images = all_reduce_sum(counts).tolist()
    return {"top1": 100 * top1 / images, "top5": 100 * top5 / images, "images": int(images)}


def make_optimizer(raw_model, stage, args):
    """SGD 0.9; stage one trains everything, stage two everything but the contrastive head (unused there)."""
    params = [p for name, p in raw_model.named_parameters() if stage == 1 or not name.startswith("head.")]
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)    # lr: lr_at, per step


def selection_stats(selection, clean):
    """Selected count and fraction, the selection's precision and recall, the clean fraction, confident pairs."""
    n = 0 if selection is None else int(selection["selected"].sum())
    hits = int((clean & selection["selected"]).sum()) if n else 0
    return {"selected": n, "selected_frac": n / len(clean), "selection_precision": hits / n if n else None,
            "selection_recall": hits / max(int(clean.sum()), 1), "clean_frac_all": float(clean.float().mean()),
            "confident_pairs": selection and selection.get("pairs")}


def end_epoch(args, stage, epoch, record, raw_model, optimizer, data, selection, best, stage1, rank, memory=None):
    """After each epoch of either stage: returns the best (top1, top5, epoch); rank 0 logs the record and writes
    <out>/checkpoint.pt, all that --resume needs (in stage one Sel-CL's memory too)."""
    if (record["top1"], record["top5"]) > (best["top1"], best["top5"]):
        best = {"top1": record["top1"], "top5": record["top5"], "epoch": epoch}
    if rank == 0:
        log_record(args.out, {"epoch": epoch, "stage": stage, **record, **selection_stats(selection, data["clean"])})
    if rank == 0 and args.out:
        save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "stage": stage,
                     "epoch": epoch + 1, "best": best, "stage1": stage1, "selection": selection,
                     "memory": memory and {k: v.state_dict() if k == "ema" else v for k, v in memory.items()},
                     "args": vars(args)}, os.path.join(args.out, "checkpoint.pt"))
    return best


def train_stage(args, stage, model, raw_model, teacher, data, selection, best, stage1, start, resumed, rank,
                world_size):
    """Stage one, Sel-CL (epochs start .. --epochs − 1, selecting confident examples and pairs after each, the first
    without; then <out>/stage1_model.pt) or two, Sel-CL+ (to --epochs + --finetune-epochs − 1 on the confident
    examples, a new classifier). `resumed`: a checkpoint's (optimizer state, stage one's memory state) or None.
    Returns (selection, best, stage one's last top1/5, the last epoch's evaluation)."""
    optimizer, memory = make_optimizer(raw_model, stage, args), None
    if resumed is not None:
        optimizer.load_state_dict(resumed[0])
    if stage == 1:
        memory = selcl_memory(args, raw_model, data["num_classes"], data["train_x"].device, resumed and resumed[1])
    elif resumed is None:           # a fresh classifier (official ReInitializeClassif); the head is no longer trained
        torch.manual_seed(seeded("classifier", args.seed).initial_seed())
        raw_model.linear2.reset_parameters()
    for epoch in range(start, args.epochs + (args.finetune_epochs if stage == 2 else 0)):
        t0 = time.time()
        stats = train_one_epoch(args, stage, model, raw_model, teacher, optimizer, data, selection, epoch, rank,
                                world_size, memory=memory)
        if stage == 1:
            selection = reselect(args, raw_model, data, rank, world_size)      # for the next epoch, or stage two
        evaluation = evaluate(args, raw_model, data, rank, world_size)
        if stage == 1:
            stage1 = {"top1": evaluation["top1"], "top5": evaluation["top5"]} if epoch == args.epochs - 1 else None
        if stage == 1 and stage1 and rank == 0 and args.out:    # before checkpoint.pt: resuming it skips stage one
            save_atomic({"model": raw_model.state_dict(), "selected": selection["selected"].cpu(),
                         "noisy_labels": data["noisy_y"].cpu(), "epoch": args.epochs, "args": vars(args),
                         **stage1}, os.path.join(args.out, "stage1_model.pt"))
        best = end_epoch(args, stage, epoch, {**stats, **evaluation, "seconds": time.time() - t0}, raw_model, optimizer,
                         data, selection, best, stage1, rank, memory)
    return selection, best, stage1, evaluation


def main(args):
    rank, world_size, device = setup_distributed()
    try:
        start_time = time.time()
        torch.backends.cudnn.benchmark = True       # a few fixed batch shapes: let cuDNN pick its fastest kernels
        if not (args.eval_only or args.benchmark):
            ckpt = open_run(args, rank)             # the checkpoint to resume from, or None (a fresh run)
        elif args.out:                              # these write only results.json / benchmark.json, into any folder
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise UserError(f"--out {args.out} is a file; pass a folder (it is created if missing)")
            if args.eval_only and os.path.exists(os.path.join(args.out, "results.json")) and not args.overwrite:
                raise UserError(f"--out {args.out} holds a results.json; pass another --out, or --overwrite to replace "
                                "it")
            make_out(args.out)
        data = load_data(args, rank, world_size, device)
        torch.manual_seed(args.seed)                # the same student initialisation for every --loss
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        model = raw_model = MODELS[args.model](data["num_classes"]).to(device, memory_format=layout)
        if world_size > 1:          # for stage two (stage one sums the gradients of its global losses itself)
            model = DistributedDataParallel(raw_model, device_ids=[device] if device.type == "cuda" else None,
                                            find_unused_parameters=True)
        if args.eval_only:
            load_weights(raw_model, load_state_dict(args.eval_only, "--eval-only"), f"--eval-only {args.eval_only}")
            results = {**evaluate(args, raw_model, data, rank, world_size), "checkpoint": args.eval_only,
                       **run_info(world_size, device), "args": vars(args)}
            if rank == 0:
                print(f"eval-only {args.eval_only}: top1 {results['top1']:.2f}  top5 {results['top5']:.2f}")
                if args.out:
                    write_text(json.dumps(results, indent=2), os.path.join(args.out, "results.json"))
            return results
        teacher = None if args.loss == "ce" else load_teacher(args, data, device)
        if args.benchmark:          # 5 warm-up steps, then STEPS timed ones, of each stage; every image confident
            n = len(data["train_x"])
            selection = {"selected": torch.ones(n, dtype=torch.bool, device=device), "threshold": 1.0,
                         "embed": torch.zeros(n, 1, device=device)}               # confident pairs: same label
            results = {"batch_size": args.batch_size, "world_size": world_size}
            for stage, epoch, key, name in [(1, SUP_QUEUE_FROM, "", "one (Sel-CL)"),
                                            (2, args.epochs + args.label_correction_epoch, "stage2_", "two (Sel-CL+)")]:
                optimizer = make_optimizer(raw_model, stage, args)
                for steps in (5, args.benchmark):       # the returned floats synchronise the device
                    t0 = time.time()
                    train_one_epoch(args, stage, model, raw_model, teacher, optimizer, data, selection, epoch, rank,
                                    world_size, max_steps=steps)
                seconds = time.time() - t0
                images_per_s, ms_per_step = steps * args.batch_size * world_size / seconds, 1000 * seconds / steps
                results.update({key + "images_per_s": images_per_s, key + "ms_per_step": ms_per_step})
                if rank == 0:
                    print(f"benchmark stage {name}: {images_per_s:.0f} images/s, {ms_per_step:.1f} ms/step (batch "
                          f"{args.batch_size} × {world_size})", flush=True)
            if rank == 0 and args.out:
                write_text(json.dumps(results, indent=2), os.path.join(args.out, "benchmark.json"))
            return results
        teacher_top1 = None if teacher is None else evaluate(args, teacher, data, rank, world_size)["top1"]
        if rank == 0:
            print(f"{args.dataset}, {args.noise_type} noise {args.noise_rate} (realised "
                  f"{data['noise']['noise_rate']:.4f}); {args.model}, loss {args.loss}, KD T {args.kd_T}, teacher top1 "
                  f"{teacher_top1}; global batch {args.batch_size * world_size} ({args.batch_size} × {world_size})",
                  flush=True)
            if args.out:
                np.save(os.path.join(args.out, "noisy_labels.npy"), data["noisy_y"].cpu().numpy())
                write_text(json.dumps({"noise_type": args.noise_type, "noise_rate_requested": args.noise_rate,
                                       "noise_seed": args.noise_seed, "from_file": args.noisy_labels,
                                       **data["noise"]}, indent=2), os.path.join(args.out, "noise.json"))

        selection, stage1, best, start_epoch, optimizer_states = None, None, {"top1": 0.0, "top5": 0.0}, 0, {}
        if ckpt is not None:        # one epoch counter over both stages: stage two starts at --epochs
            if ckpt["args"]["epochs"] != args.epochs and (ckpt["stage"] == 2 or ckpt["epoch"] >= args.epochs):
                raise UserError(f"--resume: the run in --out has done {ckpt['epoch']} epochs with --epochs "
                                f"{ckpt['args']['epochs']}; --epochs may change only in stage one and stay above the "
                                f"epochs done: pass --epochs {ckpt['args']['epochs']}")
            load_weights(raw_model, ckpt["model"], f"--resume {os.path.join(args.out, 'checkpoint.pt')}")
            start_epoch, best, stage1, optimizer_states = ckpt["epoch"], ckpt["best"], ckpt["stage1"], \
                {ckpt["stage"]: (ckpt["optimizer"], ckpt.get("memory"))}
            selection = ckpt["selection"] and {k: v.to(device) if torch.is_tensor(v) else v
                                               for k, v in ckpt["selection"].items()}
        elif args.stage1_ckpt:      # stage one's weights and selection from a run on the same noisy labels
            state = read_checkpoint(args.stage1_ckpt, "--stage1-ckpt")
            labels = state.get("noisy_labels") if isinstance(state, dict) else None
            if not (isinstance(labels, torch.Tensor) and torch.equal(labels, data["noisy_y"].cpu()) and "selected"
                    in state and isinstance(state.get("model"), dict)):
                raise UserError(f"--stage1-ckpt {args.stage1_ckpt} holds no selection for these noisy labels; pass "
                                "the stage1_model.pt of a noisy.py run on the same data with the same --noisy-labels")
            if state["epoch"] != args.epochs:       # so epochs count on as in the run that wrote it
                raise UserError(f"--stage1-ckpt {args.stage1_ckpt} ended stage one after {state['epoch']} epochs; "
                                f"pass --epochs {state['epoch']}")
            load_weights(raw_model, state["model"], f"--stage1-ckpt {args.stage1_ckpt}")
            selection, stage1 = {"selected": state["selected"].to(device)}, {k: state[k] for k in ("top1", "top5")}
            start_epoch = args.epochs

        if start_epoch < args.epochs:
            selection, best, stage1, _ = train_stage(args, 1, raw_model, raw_model, None, data, selection, best, stage1,
                                                     start_epoch, optimizer_states.get(1), rank, world_size)
        if max(start_epoch, args.epochs) < args.epochs + args.finetune_epochs:
            _, best, _, evaluation = train_stage(args, 2, model, raw_model, teacher, data, selection, best, stage1,
                                                 max(start_epoch, args.epochs), optimizer_states.get(2), rank,
                                                 world_size)
        else:                       # no stage-two epoch to run (--finetune-epochs 0, or a finished run resumed)
            evaluation = evaluate(args, raw_model, data, rank, world_size)

        results = {**evaluation, "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best.get("epoch"),
                   "teacher_top1": teacher_top1, "stage1_top1": stage1 and stage1["top1"],
                   "stage1_top5": stage1 and stage1["top5"], "noise_rate": data["noise"]["noise_rate"],
                   **selection_stats(selection, data["clean"]), "seconds": time.time() - start_time,
                   **run_info(world_size, device), "args": vars(args)}
        if rank == 0:
            print(f"final top1 {results['top1']:.2f}  top5 {results['top5']:.2f}  (best {best['top1']:.2f} / "
                  f"{best['top5']:.2f})", flush=True)
            if args.out:
                write_text(json.dumps(results, indent=2), os.path.join(args.out, "results.json"))
        return results
    finally:
        cleanup_distributed()


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("data, noise and models")
    g.add_argument("--dataset", default="cifar100", choices=["cifar10", "cifar100", "synthetic"],
                   help="CIFAR pickles under --data-dir, or a small generated set (4 classes, 16x16)")
    g.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    g.add_argument("--noise-type", default="symmetric", choices=["symmetric", "asymmetric", "none"])
    g.add_argument("--noise-rate", type=float, default=0.2, help="the paper: 0.2 symmetric, 0.4 asymmetric")
    g.add_argument("--noise-seed", type=int, default=42, help="seed of the label noise (official seed_dataset 42)")
    g.add_argument("--noisy-labels", default=None, help="read the noisy labels from this .npy (the teacher run's)")
    g.add_argument("--model", default="preact_resnet34", choices=sorted(MODELS), help="the network trained here")
    g.add_argument("--teacher", default="preact_resnet18", choices=sorted(MODELS))
    g.add_argument("--teacher-ckpt", default=None, help="teacher weights (e.g. its run's stage1_model.pt)")
    g.add_argument("--teacher-mode", default="train", choices=["train", "eval"], help="the teacher's BatchNorm in stage "
                   "two: batch statistics (train, as the official code) or its running statistics (eval)")
    g = p.add_argument_group("stage one: Sel-CL (its first epoch is instance contrast only)")
    g.add_argument("--epochs", type=int, default=250, help="Sel-CL epochs (with --stage1-ckpt: those it ran)")
    g.add_argument("--lr", type=float, default=0.1, help="stage-one learning rate")
    g.add_argument("--milestones", type=int, nargs="*", default=[125, 200], help="epochs where the lr drops ×0.1")
    g.add_argument("--warmup-epochs", type=int, default=5, help="linear lr warm-up from lr/100")
    g.add_argument("--knn-k", type=int, default=250, help="neighbours of the kNN vote")
    g.add_argument("--select-quantile", type=float, default=None,
                   help="α: per-class budget quantile (default 0.5 CIFAR-10, 0.75/0.25 CIFAR-100 sym./asym.)")
    g.add_argument("--pair-quantile", type=float, default=None,
                   help="β: pair-similarity quantile (default 0.25 CIFAR-10, 0.35/0.0 CIFAR-100 sym./asym.)")
    g.add_argument("--stage1-ckpt", default=None, help="skip stage one: weights and selection from a stage1_model.pt")
    g = p.add_argument_group("stage two: Sel-CL+ fine-tuning, distillation")
    g.add_argument("--finetune-epochs", type=int, default=70, help="fine-tuning epochs on the confident examples")
    g.add_argument("--finetune-lr", type=float, default=1e-3, help="constant fine-tuning learning rate")
    g.add_argument("--label-correction-epoch", type=int, default=30, help="stage-two epoch of bootstrapping's start")
    g.add_argument("--loss", default="ce", choices=["ce", "kd", "rkd", "augconf", "adaptconf"],
                   help="ce trains without a teacher; the others add the teacher's term")
    g.add_argument("--gt-weight", type=float, default=1.0, help="weight of the label term (0: teacher only)")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the teacher's term")
    g.add_argument("--kd-T", type=float, default=None, help="KD temperature (default 20/10 CIFAR-10 sym./asym., 1)")
    g.add_argument("--tau", type=float, default=0.5, help="AdaptConf β temperature")
    g.add_argument("--alpha-max", type=float, default=0.5, help="AugConf final α")
    g = p.add_argument_group("optimisation and run")
    g.add_argument("--batch-size", type=int, default=128, help="per process (the recipe: 128 in total)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (momentum 0.9)")
    g.add_argument("--seed", type=int, default=1, help="seed of initialisation, shuffling and augmentation")
    g.add_argument("--out", default=None, help="output folder (log.jsonl, results.json, checkpoints)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt; starts afresh when --out holds none (first launch)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out (deletes its run)")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate these weights, write results.json")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS", help="time STEPS training steps of each "
                   "stage on generated images of CIFAR's shape (no --teacher-ckpt: a random teacher)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (CPU runs float32)")
    args = p.parse_args(argv)
    check_numbers(p, args)                  # finite; counts, rates, temperatures > 0; fractions in [0, 1]; warm-up
    c10, sym = args.dataset != "cifar100", args.noise_type == "symmetric"    # per-setting defaults (official runs)
    if args.kd_T is None:
        args.kd_T = (20.0 if sym else 10.0) if c10 else 1.0
    if args.select_quantile is None:
        args.select_quantile = 0.5 if c10 else (0.75 if sym else 0.25)
    if args.pair_quantile is None:
        args.pair_quantile = 0.25 if c10 else (0.35 if sym else 0.0)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (contrastive pairs and mixup need two samples)")
    if args.loss == "ce" and args.gt_weight == 0:
        p.error("--loss ce --gt-weight 0 leaves stage two nothing to learn; pass --gt-weight 1 or a distillation loss")
    if args.loss != "ce" and not args.teacher_ckpt and not (args.benchmark or args.eval_only):
        p.error(f"--loss {args.loss} distils from a teacher; pass --teacher-ckpt (e.g. the stage1_model.pt of a "
                "--loss ce run with --model preact_resnet18)")
    return args


if __name__ == "__main__":
    main(parse_args())
