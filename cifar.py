"""Weak-to-strong distillation on CIFAR-100 / CIFAR-10: Tables 1, 2a, 2b and Figures 2-3 of "Vision Superalignment"
(Guo et al., arXiv 2402.03749), on the RepDistiller/mdistiller model zoo (their checkpoints load with strict=True).

    # the whole experiment: CIFAR-100 fetched into --data-dir if missing, the weak teacher ShuffleV1 trained (--loss
    # ce) in runs/teachers/cifar100_ShuffleV1_seed0 or reused from there, then resnet32x4 distilled from it (Table 2a)
    # into runs/cifar100_ShuffleV1-resnet32x4_adaptconf_seed0 (the same command again continues or reprints it)
    torchrun --nproc_per_node=8 cifar.py --loss adaptconf
    torchrun --nproc_per_node=8 cifar.py --model resnet56 --loss adaptconf --out runs/r56   # <- resnet20 (Table 1)
    python cifar.py --dataset synthetic --model resnet8 --epochs 2 --warmup-epochs 0   # no data: a CPU, a minute

Paper, top-1 (mean of 3 runs): resnet20 (68.93) -> resnet56: 72.94 from scratch, 74.17 with AdaptConf (Table 1);
ShuffleV1 (72.40) -> resnet32x4: 79.90 scratch, 80.99 AdaptConf (Table 2a), 78.48 without labels (Table 2b).
The recipe is the paper's (the official cifar_v0.yaml, on timm), or cifar_v1.yaml's with --augment v1: see --help.
The training set stays on the device as uint8 and is augmented there in batches. Where we differ from the official code:
- The lr warm-up (from 0) and cosine (after the warm-up) are set per step; timm steps them per epoch from 1e-4.
- FitNet regressors are conv + BN + ReLU (mdistiller's ConvReg), not the official bare 1x1 convolutions, which cannot
  map the different spatial sizes of the Table 2 pairs.
- Feature losses use post-activation stage outputs (mdistiller's ReviewKD uses pre-activation ones); without labels
  (--gt-weight 0) FitNet, RKD and ReviewKD also learn the teacher's logits, or the classifier would get no signal.
- Crops and AutoAugment's geometric ops interpolate bilinearly (timm's training default picks bilinear or bicubic).
- A teacher trained here (no --teacher-ckpt) is its final epoch, not its best: picking the best would select a model
  on the test set (the official released teachers are probably timm's best-epoch checkpoints).
"""
import argparse
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

from common import (FeatureRegressor, ReviewKDFusion, adaptconf_beta, adaptconf_loss, augconf_alpha, augconf_loss,
                    auto_augment, beta_counts, beta_summary, dkd_loss, hcl_loss, hint_loss, kd_loss, rkd_loss,
                    topk_correct)

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


# ---- models: the RepDistiller CIFAR zoo (also mdistiller's and the official code's) ------------------------------
# Module names and shapes as published, so their checkpoints load with strict=True. Every model shares
# CifarNet.forward: stem -> stages -> pre_pool -> global average pool -> classifier. `model(x, features=True)` also
# returns [stage maps shallow -> deep..., (B, D) pooled embedding] for the feature losses.

bn = nn.BatchNorm2d


def conv(cin, cout, k=3, stride=1, groups=1, bias=False):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=bias)


def channel_shuffle(x, groups):   # (B, g·c, H, W) -> (B, c·g, H, W), one copy into x's memory format (a reshape
    out = torch.empty_like(x)     # would return NCHW: channels_last nets would switch layouts at every block on CUDA)
    return out.unflatten(1, (-1, groups)).copy_(x.unflatten(1, (groups, -1)).transpose(1, 2)).flatten(1, 2)


class CifarNet(nn.Module):
    head = "fc"   # name of the classifier, as published

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def stages(self):   # callables, shallow -> deep
        return [getattr(self, f"layer{i}") for i in range(1, 5) if hasattr(self, f"layer{i}")]

    def pre_pool(self, x):
        return x

    def forward(self, x, features=False):
        """(B, 3, H, W) -> (B, classes) logits; with features=True also [stage maps..., (B, D) embedding]."""
        maps, x = [], self.stem(x)
        for stage in self.stages():
            x = stage(x)
            maps.append(x)
        embed = F.adaptive_avg_pool2d(self.pre_pool(x).float(), 1).flatten(1)   # (B, D); = the published pools at 32
        with torch.autocast(embed.device.type, enabled=False):   # float32 logits even under bf16 autocast (cheap):
            logits = getattr(self, self.head)(embed)              # they set β (Eq. 2), where a bf16 tie is agreement
        return (logits, maps + [embed]) if features else logits

    def init_like_repdistiller(self, linear="default"):
        """RepDistiller's initialisation; `linear`: "default" (ResNet: PyTorch's), "zero_bias" (WRN) or "normal"
        (VGG, MobileNetV2: N(0, 0.01) weights, zero bias)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):   # N(0, sqrt(2 / (k·k·out))), i.e. Kaiming fan-out
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and linear != "default":
                if linear == "normal":
                    nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        return self


class ResBlock(nn.Module):
    """Basic block (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion) with a projection shortcut when the
    shape changes, named `downsample` in RepDistiller's resnet.py and `shortcut` in its resnetv2.py."""

    def __init__(self, cin, planes, stride, shortcut, bottleneck):
        super().__init__()
        out, self.shortcut_name = planes * (4 if bottleneck else 1), shortcut
        self.conv1, self.bn1 = conv(cin, planes, 1 if bottleneck else 3, 1 if bottleneck else stride), bn(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride if bottleneck else 1), bn(planes)
        if bottleneck:
            self.conv3, self.bn3 = conv(planes, out, 1), bn(out)
        needs = stride != 1 or cin != out   # an empty Sequential is the identity and holds no tensors
        setattr(self, shortcut, nn.Sequential(conv(cin, out, 1, stride), bn(out)) if needs else nn.Sequential())

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if hasattr(self, "conv3"):
            out = self.bn3(self.conv3(F.relu(out)))
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class ResNet(CifarNet):
    """resnet8..110, resnet8x4/32x4 (RepDistiller resnet.py: 3 stages, `fc`, shortcut `downsample`) and
    ResNet18/50 (resnetv2.py: 64-wide stem, 4 stages, `linear`, shortcut `shortcut`)."""

    def __init__(self, widths, depths, num_classes, stem, head="fc", shortcut="downsample", bottleneck=False):
        super().__init__()
        self.head = head
        self.conv1, self.bn1 = conv(3, stem), bn(stem)
        cin = stem
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                blocks.append(ResBlock(cin, width, 2 if i > 0 and j == 0 else 1, shortcut, bottleneck))
                cin = width * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        setattr(self, head, nn.Linear(cin, num_classes))
        self.init_like_repdistiller()


class WRNBlock(nn.Module):
    """Pre-activation wide block (wrn.py BasicBlock); `convShortcut` when the width changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = bn(cin), conv(cin, cout, 3, stride)
        self.bn2, self.conv2 = bn(cout), conv(cout, cout)
        self.convShortcut = None if cin == cout else conv(cin, cout, 1, stride)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideResNet(CifarNet):
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = conv(3, 16)
        for i in range(3):   # blockK.layer.j, as in wrn.py's NetworkBlock
            group = nn.Module()
            group.layer = nn.Sequential(*[WRNBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                                   (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)])
            setattr(self, f"block{i + 1}", group)
        self.bn1, self.fc = bn(widths[3]), nn.Linear(widths[3], num_classes)
        self.init_like_repdistiller("zero_bias")

    def stem(self, x):
        return self.conv1(x)

    def stages(self):
        return [self.block1.layer, self.block2.layer, self.block3.layer]

    def pre_pool(self, x):
        return F.relu(self.bn1(x))


VGG_CONFIGS = {8: [[64], [128], [256], [512], [512]], 11: [[64], [128], [256] * 2, [512] * 2, [512] * 2],
               **{d: [[64] * 2, [128] * 2, [256] * n, [512] * n, [512] * n] for d, n in ((13, 2), (16, 3), (19, 4))}}


class VGG(CifarNet):
    """vgg.py with batch norm: block0..block4 of (conv with bias, BN, ReLU), the last ReLU of each block applied in
    forward; max-pool after blocks 0-2 (pool3 only runs for 64x64 inputs, so never on CIFAR); `classifier`."""
    head = "classifier"

    def __init__(self, depth, num_classes):
        super().__init__()
        cin = 3
        for i, widths in enumerate(VGG_CONFIGS[depth]):
            layers = []
            for w in widths:
                layers += [conv(cin, w, bias=True), bn(w), nn.ReLU(inplace=True)]
                cin = w
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)
        self.init_like_repdistiller("normal")

    def stem(self, x):
        return F.relu(self.block0(x))

    def stages(self):
        pool = lambda block: (lambda x: F.relu(block(F.max_pool2d(x, 2))))
        return [pool(self.block1), pool(self.block2), pool(self.block3), lambda x: F.relu(self.block4(x))]


class ShuffleV1Block(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid, self.g1, self.stride = cout // 4, 1 if cin == 24 else groups, stride
        self.conv1, self.bn1 = conv(cin, mid, 1, groups=self.g1), bn(mid)
        self.conv2, self.bn2 = conv(mid, mid, 3, stride, groups=mid), bn(mid)
        self.conv3, self.bn3 = conv(mid, cout, 1, groups=groups), bn(cout)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:   # downsampling unit: concatenate an average-pooled shortcut
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleV1(CifarNet):
    head = "linear"

    def __init__(self, num_classes, widths=(240, 480, 960), depths=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1, self.bn1, cin = conv(3, 24, 1), bn(24), 24
        for i, (w, d) in enumerate(zip(widths, depths)):   # first block: stride 2, its w - cin outputs joined to cin
            blocks = [ShuffleV1Block(cin, w - cin, 2, groups)] + [ShuffleV1Block(w, w, 1, groups) for _ in range(d - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.linear = nn.Linear(widths[-1], num_classes)


class ShuffleV2Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        c //= 2
        self.conv1, self.bn1 = conv(c, c, 1), bn(c)
        self.conv2, self.bn2 = conv(c, c, 3, groups=c), bn(c)
        self.conv3, self.bn3 = conv(c, c, 1), bn(c)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2))))))))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = conv(cin, cin, 3, 2, groups=cin), bn(cin)        # left: depthwise s2, 1x1
        self.conv2, self.bn2 = conv(cin, mid, 1), bn(mid)
        self.conv3, self.bn3 = conv(cin, mid, 1), bn(mid)                       # right: 1x1, depthwise s2, 1x1
        self.conv4, self.bn4 = conv(mid, mid, 3, 2, groups=mid), bn(mid)
        self.conv5, self.bn5 = conv(mid, mid, 1), bn(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2(CifarNet):
    head = "linear"

    def __init__(self, num_classes, widths=(116, 232, 464), depths=(3, 7, 3), last=1024):
        super().__init__()
        self.conv1, self.bn1, cin = conv(3, 24, 1), bn(24), 24
        for i, (w, d) in enumerate(zip(widths, depths)):
            setattr(self, f"layer{i + 1}", nn.Sequential(ShuffleV2Down(cin, w), *[ShuffleV2Block(w) for _ in range(d)]))
            cin = w
        self.conv2, self.bn2 = conv(cin, last, 1), bn(last)
        self.linear = nn.Linear(last, num_classes)

    def pre_pool(self, x):
        return F.relu(self.bn2(self.conv2(x)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden, self.residual = cin * expand, stride == 1 and cin == cout
        self.conv = nn.Sequential(conv(cin, hidden, 1), bn(hidden), nn.ReLU(inplace=True),
                                  conv(hidden, hidden, 3, stride, groups=hidden), bn(hidden), nn.ReLU(inplace=True),
                                  conv(hidden, cout, 1), bn(cout))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(CifarNet):
    """mobilenetv2.py, `mobile_half`: width 0.5, expansion 6, stride-2 stem; stages end at blocks 1, 2, 4, 6."""
    head = "classifier"

    def __init__(self, num_classes, expand=6, width=0.5):
        super().__init__()
        setting = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2), (expand, 96, 3, 1),
                   (expand, 160, 3, 2), (expand, 320, 1, 1)]   # (expansion, channels, blocks, stride)
        cin = int(32 * width)
        self.conv1 = nn.Sequential(conv(3, cin, 3, 2), bn(cin), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            cout = int(c * width)
            self.blocks.append(nn.Sequential(*[InvertedResidual(cin if j == 0 else cout, cout, s if j == 0 else 1, t)
                                               for j in range(n)]))
            cin = cout
        self.conv2 = nn.Sequential(conv(cin, 1280, 1), bn(1280), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))
        self.init_like_repdistiller("normal")

    def stem(self, x):
        return self.conv1(x)

    def stages(self):
        b = self.blocks
        return [nn.Sequential(b[0], b[1]), b[2], nn.Sequential(b[3], b[4]), nn.Sequential(b[5], b[6])]

    def pre_pool(self, x):
        return self.conv2(x)


MODELS = {
    **{f"resnet{d}": (lambda d: lambda nc: ResNet([16, 32, 64], [(d - 2) // 6] * 3, nc, 16))(d)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}x4": (lambda d: lambda nc: ResNet([64, 128, 256], [(d - 2) // 6] * 3, nc, 32))(d) for d in (8, 32)},
    **{f"wrn_{d}_{w}": (lambda d, w: lambda nc: WideResNet(d, w, nc))(d, w) for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}": (lambda d: lambda nc: VGG(d, nc))(d) for d in (8, 11, 13, 16, 19)},
    "ShuffleV1": ShuffleV1, "ShuffleV2": ShuffleV2, "MobileNetV2": MobileNetV2,
    "ResNet18": lambda nc: ResNet([64, 128, 256, 512], [2, 2, 2, 2], nc, 64, "linear", "shortcut"),
    "ResNet50": lambda nc: ResNet([64, 128, 256, 512], [3, 4, 6, 3], nc, 64, "linear", "shortcut", True),
}


def build_model(name, num_classes):
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes)


# ---- data: uint8 tensors resident on the device, augmented there in batches --------------------------------------

MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "default": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}   # CIFAR-100's, also for synthetic
CIFAR_FILES = {   # folder, training files, test files, label key, classes
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10)}


def read_cifar(data_dir, dataset, rank=0):
    """The python-pickle release read directly: (train_x, train_y, test_x, test_y, classes); x uint8 (N, 3, 32, 32).
    Missing from --data-dir: rank 0 fetches it with torchvision first, the others wait for its answer."""
    folder, train_files, test_files, label_key, classes = CIFAR_FILES[dataset]
    find = lambda: next((r for r in (os.path.join(data_dir, folder), data_dir)   # --data-dir or the folder itself
                         if all(os.path.isfile(os.path.join(r, f)) for f in train_files + test_files)), None)
    root, failed = find(), [None]
    if root is None and rank == 0:
        try:
            import torchvision   # only to fetch and check the archive; the files are then read like any copy
            getattr(torchvision.datasets, dataset.upper())(data_dir, download=True)
        except Exception as e:   # no network, a full disk, a failed checksum
            failed[0] = f"{type(e).__name__}: {(str(e).strip() or '?').splitlines()[0][:150]}"
    if dist.is_initialized():   # every rank waits for rank 0's download (or its failure)
        dist.broadcast_object_list(failed, src=0)
    root = root or find()
    if root is None:
        raise UserError(f"{dataset} is not in --data-dir {data_dir} and could not be downloaded ({failed[0]}); put the "
                        f"extracted 'python version' of https://www.cs.toronto.edu/~kriz/cifar.html there as "
                        f"{os.path.join(data_dir, folder)}/, e.g. fetched where there is network with python -c "
                        f"\"import torchvision; torchvision.datasets.{dataset.upper()}('{data_dir}', download=True)\"")

    def read(files):
        xy = []
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(entry[label_key], dtype=np.int64)
            except Exception as e:
                raise UserError(f"{path} is not a CIFAR python-pickle file with 'data' (N x 3072 uint8) and "
                                f"'{label_key}' ({type(e).__name__}: {e}); delete it to download it again") from None
            if len(x) != len(y) or len(y) == 0 or y.min() < 0 or y.max() >= classes:
                raise UserError(f"{path} holds {len(x)} images and {len(y)} labels in [0, {classes}) expected; "
                                "delete it to download it again")
            xy.append((x, y))
        return tuple(torch.from_numpy(np.concatenate(v)) for v in zip(*xy))

    return (*read(train_files), *read(test_files), classes)


def make_synthetic(classes=10, train=2048, test=1000, seed=1234):
    """A small learnable data set: per class a colour and a stripe orientation/frequency, plus pixel noise."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(classes, 3, 1, 1))
    yy, xx = np.mgrid[0:32, 0:32]
    stripes = np.stack([np.sin((xx if k % 2 else yy) * (0.3 + 0.12 * k)) * 40 for k in range(classes)])[:, None]

    def draw(n):
        y = np.arange(n) % classes
        x = colours[y] + stripes[y] + rng.normal(0, 30, size=(n, 3, 32, 32))
        return torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8)), torch.from_numpy(y)

    return (*draw(train), *draw(test), classes)


def augment(x, recipe, gen, mean=MEAN_STD["default"][0]):
    """(B, 3, H, W) uint8 -> float in [0, 255], one random affine resampling per image (crop + flip in one step).

    paper:   random-resized-crop (area 8-100%, aspect 3/4-4/3, torchvision's 10 tries then the whole image), bilinear.
    classic: pad-4 random crop (zero padding) by integer shifts, nearest sampling, so pixels are copied exactly.
    v1:      paper's crop + flip rounded to uint8, then timm's AutoAugment "original-mstd0.5" per image, filled with
             the mean colour and translated up to 45% of the size, as timm's create_transform sets them (mixup follows).
    """
    B, _, H, W = x.shape
    dev = x.device
    if recipe == "v1":
        crops = augment(x, "paper", gen).round().to(torch.uint8)
        return auto_augment(crops, gen, magnitude_std=0.5, fill=tuple(min(255, round(255 * m)) for m in mean),
                            translate_const=int(0.45 * min(H, W))).float()
    rand = lambda *shape: torch.rand(*shape, generator=gen, device=dev)
    flip = torch.where(rand(B) < 0.5, -1.0, 1.0)
    if recipe == "paper":
        area = rand(B, 10) * (1 - 0.08) + 0.08                                   # fraction of the image, 10 tries
        ratio = torch.exp(rand(B, 10) * (2 * math.log(4 / 3)) - math.log(4 / 3))
        w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)               # fractions of W and H
        ok = (w <= 1) & (h <= 1)
        first = torch.where(ok.any(1), ok.float().argmax(1), 0)
        pick = lambda t: torch.where(ok.any(1), t.gather(1, first[:, None]).squeeze(1), torch.ones_like(t[:, 0]))
        w, h = pick(w), pick(h)
        cx, cy = (rand(B) * 2 - 1) * (1 - w), (rand(B) * 2 - 1) * (1 - h)       # crop centre, normalised coordinates
        mode, padding = "bilinear", "border"
    elif recipe == "classic":
        shift = torch.randint(-4, 5, (2, B), generator=gen, device=dev).float()
        w, h = torch.ones(B, device=dev), torch.ones(B, device=dev)
        cx, cy = shift[0] * 2 / W, shift[1] * 2 / H
        mode, padding = "nearest", "zeros"
    else:
        raise ValueError(f"unknown augmentation '{recipe}'")
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [B, 3, H, W], align_corners=False)
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode=padding, align_corners=False)


def mixup(x, labels, classes, gen, alpha=0.1):
    """timm's batch mixup as cifar_v1.yaml sets it (FastCollateMixup, mode "batch", α 0.1, no cutmix, smoothing 0):
    one λ ~ Beta(α, α) per batch (two gamma draws on the device), image i mixed with image B-1-i and rounded to
    uint8 levels. (B, 3, H, W) float in [0, 255], (B,) -> mixed images, soft targets (B, classes)."""
    gamma = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64, device=x.device), generator=gen)
    lam = gamma[0] / gamma.sum()
    mixed = (x * lam.float() + x.flip(0) * (1 - lam).float()).round()
    onehot = F.one_hot(labels, classes).float()
    return mixed, onehot * lam.float() + onehot.flip(0) * (1 - lam).float()


def load_data(args, rank, world_size, device):
    """(train_x, train_y, test_x, test_y, classes, normalize), all on the device: x uint8 (N, 3, 32, 32), the test
    images already resized/cropped for evaluation; normalize maps pixels in [0, 255] to the network's input.
    With --benchmark: random images, enough for the timed steps, and 100 classes."""
    if args.benchmark:
        n = args.batch_size * world_size * max(args.benchmark, 5)
        gen = seeded("benchmark", args.seed)
        train_x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        train_y, classes = torch.randint(0, 100, (n,), generator=gen), 100
        test_x, test_y = train_x[:1], train_y[:1]
    elif args.dataset in CIFAR_FILES:
        train_x, train_y, test_x, test_y, classes = read_cifar(args.data_dir, args.dataset, rank)
    else:
        train_x, train_y, test_x, test_y, classes = make_synthetic()
    if args.train_subset:
        train_x, train_y = train_x[:args.train_subset], train_y[:args.train_subset]
    if args.test_subset:
        test_x, test_y = test_x[:args.test_subset], test_y[:args.test_subset]
    if args.augment != "classic":   # evaluation: resize to 36, centre-crop 32 (rounded back to uint8, as PIL would)
        big = F.interpolate(test_x.float(), size=36, mode="bilinear", align_corners=False, antialias=True)
        test_x = big.round().clamp(0, 255).to(torch.uint8)[:, :, 2:34, 2:34].contiguous()
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255
                 for v in MEAN_STD.get(args.dataset, MEAN_STD["default"]))
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    normalize = lambda x: ((x - mean) / std).contiguous(memory_format=memory_format)
    return train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), classes, normalize


# ---- loss choice -------------------------------------------------------------------------------------------------

class Student(nn.Module):
    """The network being trained plus the loss's trainable heads (FitNet regressors, ReviewKD fusion), one module so
    that DDP averages the heads' gradients too. forward -> (logits, features, head outputs or None)."""

    def __init__(self, net, heads=None):
        super().__init__()
        self.net, self.heads = net, heads

    def forward(self, x):
        logits, feats = self.net(x, features=True)
        return logits, feats, (self.heads(feats) if self.heads is not None else None)


class HintRegressors(nn.Module):
    """FitNet: one FeatureRegressor (common.py) per hinted stage, student map -> teacher map shape."""

    def __init__(self, stages, student_shapes, teacher_shapes):
        super().__init__()
        self.stages = stages
        self.regressors = nn.ModuleList(FeatureRegressor(student_shapes[i][0], teacher_shapes[i][0],
                                                         student_shapes[i][1:], teacher_shapes[i][1:]) for i in stages)

    def forward(self, feats):   # [(regressed student map, stage index)]
        return [(reg(feats[i]), i) for i, reg in zip(self.stages, self.regressors)]


class ReviewHeads(ReviewKDFusion):
    """ReviewKD on all stage maps plus the pooled embedding as a 1x1 map (mdistiller's CIFAR layout)."""

    def forward(self, feats):
        return super().forward(feats[:-1] + [feats[-1][:, :, None, None]])


def build_heads(args, net, teacher):
    """The trainable modules a feature loss adds to the student (None for logit losses)."""
    if args.loss not in ("fitnet", "reviewkd"):
        return None
    with torch.no_grad():   # one forward on zeros in eval mode: [(C, H, W) per stage map..., (D,) of the embedding]
        shapes = lambda m: [tuple(f.shape[1:]) for f in m.eval()(torch.zeros(2, 3, 32, 32), features=True)[1]]
        s_shapes, t_shapes = shapes(net), shapes(teacher)
    if len(s_shapes) != len(t_shapes) and (args.loss == "reviewkd" or args.fitnet_stages == "all"):
        raise UserError(f"--loss {args.loss} pairs stages one to one, but {args.model} has {len(s_shapes) - 1} "
                        f"stages and {args.teacher} {len(t_shapes) - 1}; pick models with as many stages"
                        + (" or --fitnet-stages middle" if args.loss == "fitnet" else ""))
    if args.loss == "fitnet":
        stages = list(range(len(s_shapes) - 1)) if args.fitnet_stages == "all" else [1]
        return HintRegressors(stages, s_shapes, t_shapes)
    channels = lambda shapes: [s[0] for s in shapes]
    return ReviewHeads(channels(s_shapes), channels(t_shapes), [s[1] if len(s) > 1 else 1 for s in t_shapes],
                       mid_channels=min(512, s_shapes[-1][0]))


def loss_terms(args, epoch, student_out, teacher_out, labels):
    """{name: scalar} whose sum is the training loss. student_out = (logits, feats, head outputs); teacher_out =
    (logits, feats) or None. Labels enter only through the ground-truth term (and DKD, which needs the target)."""
    logits, feats, heads_out = student_out
    t_logits, t_feats = teacher_out if teacher_out is not None else (None, None)
    ramp = lambda warmup: min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0   # mdistiller's epoch warm-up
    terms = {}
    if args.gt_weight > 0:
        terms["gt"] = args.gt_weight * F.cross_entropy(logits, labels)
    if args.loss == "kd":
        terms["kd"] = args.kd_weight * kd_loss(logits, t_logits, T=args.kd_T)
    elif args.loss == "augconf":   # Eq. 1: (1 - α)·KD + α·CE(s, argmax s), α ramped over the first 30% of epochs
        alpha = augconf_alpha(epoch, args.epochs, args.alpha_max)
        terms["augconf"] = args.kd_weight * augconf_loss(logits, t_logits, alpha, T=args.kd_T)
    elif args.loss == "adaptconf":   # Eq. 2: per-sample β = confidence weight, detached
        terms["adaptconf"] = args.kd_weight * adaptconf_loss(logits, t_logits, tau=args.tau, T=args.kd_T)
    elif args.loss == "dkd":
        target = labels if labels.ndim == 1 else labels.argmax(1)   # mixup: the larger share, as the official DKD
        terms["dkd"] = ramp(args.dkd_warmup) * dkd_loss(logits, t_logits, target, args.dkd_alpha, args.dkd_beta,
                                                        args.dkd_T)
    elif args.loss == "rkd":   # relations between the pooled embeddings of the batch
        terms["rkd"] = rkd_loss(feats[-1], t_feats[-1])   # weights 25, 50
    elif args.loss == "fitnet":
        terms["fitnet"] = args.fitnet_weight * sum(hint_loss(s, t_feats[i]) for s, i in heads_out)
    elif args.loss == "reviewkd":
        t_all = t_feats[:-1] + [t_feats[-1][:, :, None, None]]
        terms["reviewkd"] = args.reviewkd_weight * ramp(args.reviewkd_warmup) * hcl_loss(heads_out, t_all)
    elif args.loss != "ce":
        raise ValueError(f"unknown loss '{args.loss}'")
    if args.gt_weight == 0 and args.loss in ("fitnet", "rkd", "reviewkd"):
        # teacher-only training (Table 2b): a feature loss gives the classifier no signal, so it learns the logits too
        terms["kd"] = args.kd_weight * kd_loss(logits, t_logits, T=args.kd_T)
    return terms


# ---- training and evaluation -------------------------------------------------------------------------------------

def lr_at(args, step, steps_per_epoch, global_batch):
    """Linear warm-up, then cosine to --min-lr, per step; both ends scale linearly with the global batch (from 512)."""
    peak, final = args.lr * global_batch / 512, args.min_lr * global_batch / 512
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_one_epoch(args, epoch, model, teacher, optimizer, train_x, train_y, classes, normalize, rank, world_size,
                    max_steps=None):
    """One pass over this process's disjoint shard; returns {"loss", "loss_<term>": epoch mean over all processes}.
    Nothing is read back from the device inside the loop: the terms are summed there and read once at the end."""
    steps = (len(train_x) // world_size) // args.batch_size
    order = torch.randperm(len(train_x), generator=seeded("shuffle", args.seed, epoch))   # the same on every rank
    shard = order[:steps * args.batch_size * world_size][rank::world_size].to(train_x.device)
    gen = seeded("augment", args.seed, rank, epoch, device=train_x.device)   # re-seeded per epoch: exact --resume
    use_amp = args.amp and train_x.device.type == "cuda"
    mean = MEAN_STD.get(args.dataset, MEAN_STD["default"])[0]   # AutoAugment's fill colour
    model.train()
    sums, run_steps = {}, min(steps, max_steps or steps)
    progress = Progress(rank, run_steps, args.batch_size * world_size,
                        1 if max_steps else min(args.epochs, args.stop_after or args.epochs) - epoch)
    for step in range(run_steps):
        idx = shard[step * args.batch_size:(step + 1) * args.batch_size]
        x, labels = augment(train_x[idx], args.augment, gen, mean), train_y[idx]
        if args.augment == "v1":   # soft targets for the ground-truth term; the teacher sees the mixed image too
            x, labels = mixup(x, labels, classes, gen)
        x = normalize(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = teacher(x, features=True)   # frozen, eval mode
            terms = loss_terms(args, epoch, model(x), teacher_out, labels)
            loss = sum(terms.values())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, epoch * steps + step, steps, args.batch_size * world_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        progress.step(step + 1)   # host clocks only: nothing read from the device
    means = all_reduce_sum(torch.stack(list(sums.values()))) / (world_size * run_steps)
    means = dict(zip(sums, means.tolist()))
    check_finite(means, epoch)
    return means


@torch.no_grad()
def evaluate(args, raw_model, test_x, test_y, normalize, rank, world_size, teacher=None):
    """Top-1/top-5 on the whole test set: each process takes images rank::world_size (no padding, no duplicates) and
    the counts are summed over processes. With a teacher, also the β of Eq. 2 on the test set (Figure 3). Runs in
    float32: bf16 logits tie or swap the top class for ~1% of images, and β = 0.5 counts exact agreement."""
    was_training = raw_model.training
    raw_model.eval()
    counts = torch.zeros(3, device=test_x.device)   # top-1 correct, top-5 correct, images
    betas = torch.zeros(13, device=test_x.device)    # common.beta_counts
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):   # TF32 off: GPU agrees with CPU
        for idx in torch.arange(rank, len(test_x), world_size, device=test_x.device).split(1000):
            x = normalize(test_x[idx].float())
            logits = raw_model(x).float()
            counts += torch.cat([topk_correct(logits, test_y[idx], (1, 5)), counts.new_full((1,), float(len(idx)))])
            if teacher is not None:
                betas += beta_counts(adaptconf_beta(logits, teacher(x).float(), tau=args.tau))
    raw_model.train(was_training)
    top1, top5, n = all_reduce_sum(counts).tolist()
    result = {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "images": int(n)}
    return {**result, **beta_summary(all_reduce_sum(betas), "beta")} if teacher is not None else result


# The paper's CIFAR-100 top-1 (mean of 3 runs) per (teacher, student): teacher, student from scratch, then with labels
# (Table 1; Table 2a where a "|" follows) LOSSES in order; after "|" without labels (Table 2b, --gt-weight 0) LOSSES_2B.
# A student's first pair names its default teacher.
LOSSES, LOSSES_2B = "kd fitnet rkd reviewkd dkd augconf adaptconf".split(), "kd fitnet rkd augconf adaptconf".split()
PAPER = {
    "resnet20 resnet56": "68.93 72.94 73.81 70.51 72.98 70.15 73.90 73.86 74.17",
    "resnet32 resnet110": "71.72 74.80 76.45 73.15 75.62 72.30 76.57 76.72 76.86",
    "resnet8x4 resnet32x4": "72.41 79.90 79.32 77.65 80.10 77.22 79.52 80.34 80.64",
    "wrn_16_2 wrn_40_2": "72.71 77.20 78.25 76.71 77.27 75.86 78.18 78.34 78.58",
    "wrn_40_1 wrn_40_2": "72.30 77.20 77.97 76.12 77.76 75.78 77.95 78.15 78.40",
    "vgg8 vgg13": "71.99 75.26 76.41 76.39 76.20 74.22 76.62 76.55 76.84",
    "ShuffleV1 resnet32x4": "72.40 79.90 80.19 77.61 80.30 78.43 80.55 80.62 80.99 | 77.92 75.74 76.59 78.25 78.48",
    "ShuffleV1 wrn_40_2": "72.40 77.20 78.02 75.15 77.23 75.98 78.10 77.92 78.55 | 76.45 74.03 75.70 76.37 76.66",
    "MobileNetV2 vgg13": "66.85 75.26 75.39 72.36 76.21 73.69 75.81 76.43 76.58 | 72.13 70.57 70.28 72.51 72.93",
    "MobileNetV2 ResNet50": "66.85 80.43 78.64 75.92 79.89 77.05 79.65 80.75 80.98 | 73.32 71.45 72.06 74.48 74.67",
    "ShuffleV2 resnet32x4": "74.44 79.90 80.31 78.05 80.39 77.84 80.67 80.84 81.06 | 78.27 76.42 77.84 78.81 79.04",
}


def paper_top1(args, model, loss):
    """(top-1, table) the paper reports for `model` trained with `loss` (from args.teacher, with or without labels)
    on CIFAR-100, or (None, None); a ce run gets its "Teacher" or "Student" row. Figure 2's α and τ get none."""
    if args.dataset != "cifar100" or {"augconf": args.alpha_max, "adaptconf": args.tau}.get(loss, 0.5) != 0.5:
        return None, None
    for pair, row in PAPER.items():
        (t, s), (labelled, _, unlabelled) = pair.split(), (part.split() for part in row.partition(" | "))
        table = "Table 2a" if unlabelled else "Table 1"
        if loss == "ce" and model in (t, s):
            return float(labelled[model == s]), table
        if loss != "ce" and (t, s) == (args.teacher, model) and args.gt_weight > 0:
            return float(labelled[2 + LOSSES.index(loss)]), table
        if loss in LOSSES_2B and (t, s) == (args.teacher, model) and unlabelled:
            return float(unlabelled[LOSSES_2B.index(loss)]), "Table 2b"
    return None, None


RECIPE = ["dataset", "augment", "train_subset", "test_subset", "epochs", "batch_size", "lr", "min_lr", "warmup_epochs",
          "weight_decay", "amp"]   # what a trained teacher shares with its student


def train_teacher(args, rank):
    """No --teacher-ckpt: the --loss ce run of --teacher with the student's RECIPE and --teacher-seed in
    --teacher-cache, reused when finished, else trained (or resumed) there first by all processes together, in this
    process group. Rank 0 decides, so every rank agrees; returns the checkpoint every rank then loads."""
    t_args = parse_args(["--model", args.teacher, "--loss", "ce", "--seed", str(args.teacher_seed), "--data-dir",
                         args.data_dir, "--out", args.teacher_cache, "--resume"])
    for k in RECIPE:
        setattr(t_args, k, getattr(args, k))
    state, path = ["train"], os.path.join(args.teacher_cache, "checkpoint.pt")
    if rank == 0 and os.path.isfile(path):   # its arguments, finished or not, must be t_args
        ckpt, world = read_checkpoint(path, "--teacher-cache"), int(os.environ.get("WORLD_SIZE", 1))
        saved = ckpt["args"] if isinstance(ckpt, dict) and {"args", "epoch"} <= set(ckpt) else {}
        done = bool(saved) and ckpt["epoch"] >= saved.get("epochs", math.inf)
        if done:   # finished: serves any process count with the same global batch; flags added since are not held
            now = {k: v * world if k == "batch_size" else v for k, v in vars(t_args).items() if k in saved}
            saved = {**saved, "batch_size": saved["batch_size"] * saved.get("world_size", 1)}
        else:   # unfinished: open_run continues it only with the same arguments and process count
            now = {**vars(t_args), "world_size": world}
        differ = [("processes" if k == "world_size" else "--" + k.replace("_", "-") + " x processes" * (
            done and k == "batch_size")) + f" ({saved.get(k)} there, {v} now)" for k, v in now.items()
            if k not in FREE - {"epochs"} and saved.get(k) != v]
        state = [f"--teacher-cache {path} was not written by this script; pass another --teacher-cache, or "
                 "--teacher-ckpt" if not saved else f"--teacher-cache {args.teacher_cache} holds "
                 f"{'a' if done else 'an unfinished'} teacher trained with other {', '.join(differ)}; pass another "
                 "--teacher-cache, or --teacher-ckpt" if differ else "reuse" if done else "train"]
    if dist.is_initialized():
        dist.broadcast_object_list(state, src=0)
    if state[0] not in ("train", "reuse"):
        raise UserError(state[0])
    if rank == 0:
        print(f"{args.model} <- {args.teacher} ({args.loss}), no --teacher-ckpt: " + (
            "the teacher is the finished run in " if state[0] == "reuse" else
            f"training the teacher first (--loss ce, --seed {args.teacher_seed}) in ") + args.teacher_cache, flush=True)
    if state[0] == "train":
        main(t_args)   # in this process group, which it leaves open
        if dist.is_initialized():
            dist.barrier()   # rank 0 has written its checkpoint and results.json
    return os.path.join(args.teacher_cache, "checkpoint.pt")


def main(args):
    nested = dist.is_initialized()   # the teacher's run from train_teacher: it uses the caller's process group
    rank, world_size, device = (dist.get_rank(), dist.get_world_size(), torch.device(
        "cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")) if nested \
        else setup_distributed()
    try:
        torch.backends.cudnn.benchmark = True   # fixed 32x32 shapes: let cuDNN pick its fastest kernels
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        ckpt = None
        if not (args.eval_only or args.benchmark):
            ckpt = open_run(args, rank)   # --out, --resume, --overwrite: checked before any data is read
        elif args.out:   # these write one file, results.json or benchmark.json, into a new or existing folder
            report = os.path.join(args.out, "results.json" if args.eval_only else "benchmark.json")
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise UserError(f"--out {args.out} is a file; pass a folder (it is created if missing)")
            if os.path.exists(report) and not args.overwrite:
                raise UserError(f"--out {args.out} already holds {os.path.basename(report)}; pass --overwrite to "
                                "replace it, or another --out")
            if rank == 0:
                make_out(args.out)
        teacher_ckpt = args.teacher_ckpt
        if args.loss != "ce" and not (teacher_ckpt or args.eval_only or args.benchmark):
            teacher_ckpt = train_teacher(args, rank)
        train_x, train_y, test_x, test_y, classes, normalize = load_data(args, rank, world_size, device)
        if args.eval_only:
            net = build_model(args.model, classes).to(device, memory_format=memory_format)
            load_weights(net, load_state_dict(args.eval_only, "--eval-only"), f"--eval-only {args.eval_only}")
            result = evaluate(args, net, test_x, test_y, normalize, rank, world_size)
            if rank == 0:
                print(f"eval {args.eval_only}: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}", flush=True)
                if args.out:
                    write_text(json.dumps({**result, **run_info(world_size, device), "args": vars(args)}, indent=2),
                               f"{args.out}/results.json")
            return result

        teacher = None
        if args.loss != "ce":   # frozen; loaded first, so that a wrong checkpoint fails before any training
            teacher = build_model(args.teacher, classes).eval().requires_grad_(False)
            if teacher_ckpt:   # only --benchmark runs without one (random weights)
                load_weights(teacher, load_state_dict(teacher_ckpt, "--teacher-ckpt"), f"--teacher-ckpt {teacher_ckpt}")
        torch.manual_seed(args.seed)   # the same student initialisation whatever the loss and teacher
        net = build_model(args.model, classes)
        heads = build_heads(args, net, teacher)
        raw_model = Student(net, heads).to(device, memory_format=memory_format)
        if teacher is not None:
            teacher.to(device, memory_format=memory_format)
        model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None) \
            if world_size > 1 else raw_model
        params = [p for p in raw_model.parameters() if p.requires_grad]   # no weight decay on biases and BN (timm)
        optimizer = torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
                                     {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                                    lr=args.lr, momentum=0.9, nesterov=True)
        global_batch = args.batch_size * world_size
        steps = (len(train_x) // world_size) // args.batch_size
        if steps == 0:
            raise UserError(f"{len(train_x)} training images cannot fill one batch of {args.batch_size} on each of "
                            f"{world_size} processes; lower --batch-size or raise --train-subset")
        epoch_train = lambda epoch, max_steps=None: train_one_epoch(
            args, epoch, model, teacher, optimizer, train_x, train_y, classes, normalize, rank, world_size, max_steps)

        if args.benchmark:   # the training loop itself on random images: 5 warm-up steps, then STEPS timed
            epoch_train(0, 5)
            start = time.time()
            epoch_train(0, args.benchmark)   # reading the returned means waits for the device
            seconds = time.time() - start
            result = {"images_per_s": args.benchmark * global_batch / seconds,
                      "ms_per_step": 1000 * seconds / args.benchmark, "world_size": world_size, "args": vars(args)}
            if rank == 0:
                print(f"benchmark: {args.model} <- {args.teacher or 'labels'} ({args.loss}), global batch "
                      f"{global_batch} on {world_size} x {device}: {result['images_per_s']:.0f} images/s, "
                      f"{result['ms_per_step']:.1f} ms/step", flush=True)
                if args.out:
                    write_text(json.dumps(result, indent=2), f"{args.out}/benchmark.json")
            return result

        start_epoch, best, seconds = 0, {"top1": -1.0, "top5": -1.0, "epoch": -1}, 0.0
        if ckpt is not None:   # open_run checked that it comes from a run with the same arguments
            net.load_state_dict(ckpt["model"])
            if heads is not None:
                heads.load_state_dict(ckpt["heads"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, best, seconds = ckpt["epoch"], ckpt["best"], ckpt["seconds"]
        teacher_top1 = evaluate(args, teacher, test_x, test_y, normalize, rank, world_size)["top1"] if teacher else None
        if rank == 0:
            print(f"{args.model} <- {args.teacher or 'labels'} ({args.loss}) on {args.dataset}: {len(train_x)} train / "
                  f"{len(test_x)} test images, {classes} classes; {world_size} process(es) on {device}, bf16 "
                  f"{args.amp and device.type == 'cuda'}; global batch {global_batch} -> peak lr "
                  f"{args.lr * global_batch / 512:.4g} (= {args.lr} x {global_batch}/512), {steps} steps/epoch"
                  + (f"; teacher top1 {teacher_top1:.2f}" if teacher else ""), flush=True)

        metrics, stop = None, min(args.epochs, args.stop_after or args.epochs)
        for epoch in range(start_epoch, stop):
            start = time.time()
            means = epoch_train(epoch)
            train_seconds = time.time() - start
            broadcast_buffers(raw_model)   # every process scores the BN statistics rank 0 saves
            metrics = evaluate(args, net, test_x, test_y, normalize, rank, world_size,
                               teacher if args.loss == "adaptconf" else None)
            seconds += time.time() - start
            if metrics["top1"] > best["top1"]:
                best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch}
            if rank == 0:
                log_record(args.out, {"epoch": epoch, "lr": lr_at(args, (epoch + 1) * steps - 1, steps, global_batch),
                                      **means, **metrics, "images_per_s": steps * global_batch / train_seconds,
                                      "seconds": time.time() - start})
                if args.out:
                    save_atomic({"model": net.state_dict(), "heads": heads.state_dict() if heads else None,
                                 "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "args": vars(args),
                                 "best": best, "seconds": seconds}, os.path.join(args.out, "checkpoint.pt"))

        metrics = metrics or evaluate(args, net, test_x, test_y, normalize, rank, world_size)   # resumed a finished run
        paper, table = paper_top1(args, args.model, args.loss)
        results = {"top1": metrics["top1"], "top5": metrics["top5"], "best_top1": best["top1"],
                   "best_top5": best["top5"], "best_epoch": best["epoch"], "teacher_top1": teacher_top1,
                   "paper_top1": paper, "paper_table": table,
                   "teacher_paper_top1": paper_top1(args, args.teacher, "ce")[0] if teacher else None,
                   "images": metrics["images"], "epochs_done": max(stop, start_epoch), "seconds": seconds,
                   **run_info(world_size, device), "args": vars(args)}
        if rank == 0:   # the end table
            number = lambda v: f"{v:7.2f}" if v is not None else "      -"
            print(f"{f'done in {seconds:.0f} s':34s}  final   best  paper" + (f"  ({table}: mean of 3 runs; the "
                  "official code keeps the best epoch)" if table else ""), flush=True)
            if teacher:
                print(f"{'teacher ' + args.teacher:34s}{teacher_top1:7.2f}{'':7s}"
                      f"{number(results['teacher_paper_top1'])}")
            print(f"{f'student {args.model} ({args.loss})':34s}{results['top1']:7.2f}{best['top1']:7.2f}"
                  f"{number(paper)}  (best at epoch {best['epoch']})", flush=True)
            if args.out:
                write_text(json.dumps(results, indent=2), f"{args.out}/results.json")
        return results
    finally:
        if not nested:
            cleanup_distributed()


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=["cifar100", "cifar10", "synthetic"],
                   help="python-pickle CIFAR, or a small learnable set generated in memory (no files)")
    g.add_argument("--data-dir", default="./data",
                   help="folder holding cifar-100-python/ or cifar-10-batches-py/ (downloaded there when missing)")
    g.add_argument("--augment", default="paper", choices=["paper", "classic", "v1"],
                   help="paper (official cifar_v0.yaml): random-resized-crop + flip, eval resize 36/crop 32; v1 "
                        "(cifar_v1.yaml): the same + AutoAugment + mixup 0.1; classic (mdistiller): pad-4 crop + "
                        "flip, raw eval")
    g.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (0 = all)")
    g.add_argument("--test-subset", type=int, default=0, help="use only the first N test images (0 = all)")
    g = p.add_argument_group("models")
    g.add_argument("--model", default=None, choices=list(MODELS), help="the model trained (the student); default "
                   "resnet32x4, distilled from ShuffleV1 when --teacher is not given either (Table 2a's first pair)")
    g.add_argument("--teacher", default=None, choices=list(MODELS), help="the frozen (weak) teacher; default --model's "
                   "in Table 1, else in Table 2a (resnet56 <- resnet20, resnet110 <- resnet32, resnet32x4 <- "
                   "resnet8x4, wrn_40_2 <- wrn_16_2, vgg13 <- vgg8, ResNet50 <- MobileNetV2)")
    g.add_argument("--teacher-ckpt", default=None, help="teacher weights: ours, RepDistiller, mdistiller or official; "
                   "without: trained first (--loss ce, this recipe and data) in --teacher-cache, or reused from there "
                   "when finished (random with --benchmark)")
    g.add_argument("--teacher-seed", type=int, default=0, help="seed of that teacher (one for all student seeds)")
    g.add_argument("--teacher-cache", default=None,
                   help="the teacher's run folder; default runs/teachers/<dataset>_<teacher>_seed<teacher-seed>")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="ce",
                   choices=["ce", "kd", "fitnet", "rkd", "reviewkd", "dkd", "augconf", "adaptconf"],
                   help="ce trains from labels (a teacher or a baseline); the others distil from --teacher")
    g.add_argument("--gt-weight", type=float, default=1.0, help="weight of CE(student, label); 0 = teacher only")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the kd / augconf / adaptconf term")
    g.add_argument("--kd-T", type=float, default=1.0, help="KD temperature (official 1; mdistiller's KD uses 4)")
    g.add_argument("--alpha-max", type=float, default=0.5, help="augconf: final α of Eq. 1 (Figure 2: 0.1-0.9)")
    g.add_argument("--tau", type=float, default=0.5, help="adaptconf: β temperature of Eq. 2 (Figure 2's T: 0.1-8)")
    g.add_argument("--dkd-alpha", type=float, default=1.0, help="DKD weight of TCKD (official 1; mdistiller 1)")
    g.add_argument("--dkd-beta", type=float, default=2.0, help="DKD weight of NCKD (official 2; mdistiller 8)")
    g.add_argument("--dkd-T", type=float, default=1.0, help="DKD temperature (official 1; mdistiller 4)")
    g.add_argument("--dkd-warmup", type=int, default=0, help="DKD weight ramps over this many epochs (mdistiller 20)")
    g.add_argument("--fitnet-weight", type=float, default=1.0, help="FitNet hint weight (official 1; mdistiller 100)")
    g.add_argument("--fitnet-stages", default="all", choices=["all", "middle"],
                   help="hint every stage (official code) or the 2nd stage only (mdistiller)")
    g.add_argument("--reviewkd-weight", type=float, default=5.0, help="ReviewKD HCL weight (mdistiller CIFAR 5)")
    g.add_argument("--reviewkd-warmup", type=int, default=20, help="ReviewKD weight ramps over this many epochs")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=240, help="length of the schedule")
    g.add_argument("--batch-size", type=int, default=64, help="images per process per step (8 x 64 = paper's 512)")
    g.add_argument("--lr", type=float, default=0.2,
                   help="peak lr of SGD (Nesterov 0.9) at global batch 512; scaled linearly")
    g.add_argument("--min-lr", type=float, default=2e-3, help="final cosine lr for a global batch of 512; scaled too")
    g.add_argument("--warmup-epochs", type=int, default=10, help="linear lr warm-up epochs")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (not on biases and BN)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    g.add_argument("--out", default=None, help="output folder (log.jsonl, results.json, checkpoint.pt); default "
                   "runs/<dataset>_<teacher>-<model>_<loss>_seed<seed>, continued (--resume) when run again")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt; starts afresh when --out holds none (first launch)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out (deletes its run)")
    g.add_argument("--stop-after", type=int, default=0,
                   help="end after this many epochs of the --epochs schedule (0 = all); continue with --resume")
    g.add_argument("--eval-only", default=None, metavar="CKPT",
                   help="evaluate --model with these weights and exit (to <out>/results.json, replaced only with "
                        "--overwrite; nothing else in --out is touched)")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                   help="time STEPS training steps on random images (the training loop itself); print images/s "
                        "(to <out>/benchmark.json, replaced only with --overwrite)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (CPU runs float32)")
    args = p.parse_args(argv)
    check_numbers(p, args)
    if args.resume and (args.eval_only or args.benchmark):
        p.error("--resume continues a training run; it does not combine with --eval-only or --benchmark")
    if args.loss == "ce" and args.gt_weight <= 0 and not args.eval_only:
        p.error("--loss ce with --gt-weight 0 has nothing to learn from; use --gt-weight 1 or a teacher loss")
    if args.loss == "dkd" and args.gt_weight <= 0:
        p.error("DKD splits the teacher's distribution at the label's class, so it needs labels; use --gt-weight > 0 "
                "or another loss for teacher-only training")
    if args.loss != "ce" and not args.eval_only:   # the default pair, and where its teacher is trained
        firsts = {pair.split()[1]: pair.split()[0] for pair in reversed(PAPER)}   # a student's first pair
        args.teacher = args.teacher or (firsts.get(args.model) if args.model else "ShuffleV1")
        if not args.teacher:
            p.error(f"--model {args.model} has no teacher in the paper's tables; pass --teacher NAME")
        if not (args.teacher_ckpt or args.benchmark or args.teacher_cache):
            args.teacher_cache = f"runs/teachers/{args.dataset}_{args.teacher}_seed{args.teacher_seed}"
    args.model = args.model or "resnet32x4"
    if not (args.out or args.eval_only or args.benchmark):   # the results are kept; the same command again continues
        args.out = (f"runs/{args.dataset}_{args.teacher + '-' if args.loss != 'ce' else ''}{args.model}_{args.loss}"
                    f"_seed{args.seed}")
        args.resume = not args.overwrite
    return args


if __name__ == "__main__":
    main(parse_args())
