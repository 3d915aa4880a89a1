"""Weak-to-strong distillation on ImageNet-1k: Table 4 of "Vision Superalignment" (Guo et al., arXiv 2402.03749).
A weak teacher (ResNet18; MobileNetV1) trains a stronger student (ResNet34; ResNet50) with one loss of Table 4.

    torchrun --nproc_per_node=8 imagenet.py --data-dir /data/imagenet --model resnet18 --loss ce --out runs/r18
    torchrun --nproc_per_node=8 imagenet.py --data-dir /data/imagenet --model resnet34 --teacher resnet18 \\
        --teacher-ckpt runs/r18/checkpoint.pt --loss adaptconf --out runs/r18_r34_adaptconf
    python imagenet.py --model resnet50 --teacher mobilenetv1 --loss adaptconf --benchmark 50   # synthetic images

Paper, Table 4 (top-1 %, ImageNet val):   ResNet18 (69.75) -> ResNet34    MobileNetV1 (71.57) -> ResNet50
    Student from scratch (ce)                      73.47                          76.22
    KD / FitNet / RKD                      73.68 / 70.93 / 73.65          76.52 / 73.61 / 76.45
    ReviewKD / DKD                             72.99 / 73.74                  75.28 / 76.72
    AugConf / AdaptConf                        73.80 / 74.16                  76.64 / 76.94
Recipe (appendix A.1; official train.py = timm 0.6.12 + imagenet_v0.yaml + timm defaults): 100 epochs, Nesterov SGD
momentum 0.9, lr 0.1 at global batch 512 after 3 warm-up epochs from 1e-4, x0.1 every 30 epochs, weight decay 1e-4
(none on biases and BN), label smoothing 0.1, the last BN of each ResNet block zeroed; random-resized-crop 224
(bilinear or bicubic at random) + flip; eval resize 224/0.95 (the yaml's crop_pct, every model), bicubic (ResNet50,
MobileNetV1) or bilinear (ResNet18/34) as timm's model configs, crop 224.
- lr linear in the global batch (--batch-size x processes; official: 512 only); MobileNetV1 pools globally
  (official AvgPool2d(7): identical at 224, and any --image-size works).
- FitNet as the official code (1x1 conv per stage, weight 1); RKD (25/50, pooled) and ReviewKD (official: CIFAR-only)
  follow mdistiller. --gt-weight 0 (not in Table 4): feature losses also get KD on the logits (official: not).
"""
import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import transforms

from common import (ReviewKDFusion, adaptconf_beta, adaptconf_loss, augconf_alpha, augconf_loss, beta_counts,
                    beta_summary, dkd_loss, hcl_loss, hint_loss, kd_loss, rkd_loss, topk_correct)

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


# ---- models: torchvision's ResNets, and MobileNetV1 with the module names of mdistiller and the official code ----

class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard 2017), width 1.0: 4,231,976 parameters with 1000 classes. Module names as in mdistiller and
    the official code (`model.<i>`: 14 conv blocks + pooling; `fc`), so their checkpoints load with strict=True."""

    def __init__(self, num_classes=1000):
        super().__init__()

        def conv_bn(cin, cout, stride):           # full 3x3 conv
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        def conv_dw(cin, cout, stride):           # depthwise 3x3 + pointwise 1x1
            return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                 nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
            [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
        # global average pooling instead of their AvgPool2d(7): identical at 224, and any input size works
        self.model = nn.Sequential(conv_bn(3, 32, 2), *(conv_dw(*w) for w in widths), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(1024, num_classes)

    # the four stages end where the resolution halves next: blocks 0-3 (stride 4), 4-5 (8), 6-11 (16), 12-13 (32)
    STAGES = ((0, 4), (4, 6), (6, 12), (12, 14))

    def forward(self, x):
        return self.fc(self.model(x).flatten(1))


# called as MODELS[name](num_classes=n). The ResNets zero the last BN γ of every block (timm's zero_init_last, on in
# the official code; torchvision's zero_init_residual): each block starts as the identity on its residual path
MODELS = {name: functools.partial(getattr(torchvision.models, name), zero_init_residual=True)
          for name in ("resnet18", "resnet34", "resnet50")} | {"mobilenetv1": MobileNetV1}
# evaluation resize per model, as timm's configs that the official code reads: bicubic for its resnet50 and for a model
# without one (the official MobileNetV1), bilinear for resnet18/34
BICUBIC, BILINEAR = transforms.InterpolationMode.BICUBIC, transforms.InterpolationMode.BILINEAR
EVAL_INTERPOLATION = {"resnet18": BILINEAR, "resnet34": BILINEAR, "resnet50": BICUBIC, "mobilenetv1": BICUBIC}


def forward_features(model, x):
    """Runs a torchvision ResNet or MobileNetV1 and returns (logits (B, C), [4 stage outputs (B, C_i, H/2^(i+2),
    W/2^(i+2))], pooled (B, D)): the feature maps FitNet and ReviewKD compare, the embedding RKD compares."""
    feats = []
    if isinstance(model, MobileNetV1):   # a stage's output before its last ReLU, as in mdistiller and the official code
        for start, end in MobileNetV1.STAGES:
            feats.append(model.model[end - 1][:-1](model.model[start:end - 1](x)))
            x = F.relu(feats[-1])
        pool = model.model[14]
    else:   # torchvision ResNet: the stage outputs (after the ReLU), as timm's in the official code
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = stage(x)
            feats.append(x)
        pool = model.avgpool
    pooled = pool(x.float()).flatten(1)   # float32: the head and RKD read it
    with torch.autocast(x.device.type, enabled=False):   # float32 logits: β (Eq. 2) reads their top class, and bf16
        logits = model.fc(pooled.float())                 # ties in it would inflate the β = 0.5 fraction
    return logits, feats, pooled


class StudentWithHead(nn.Module):
    """The student `net` plus the trainable head of a feature loss (FitNet projections or ReviewKD fusion; None
    otherwise), one module so that DDP synchronises both. forward → (logits, stage features, pooled, head output)."""

    def __init__(self, net, head, hint_stages):
        super().__init__()
        self.net, self.head, self.hint_stages = net, head, hint_stages

    def forward(self, x):
        logits, feats, pooled = forward_features(self.net, x)
        if self.head is None:
            return logits, feats, pooled, None
        if isinstance(self.head, nn.ModuleList):   # FitNet: [projected map of each hinted stage (numbered 1-4)]
            return logits, feats, pooled, [proj(feats[k - 1]) for proj, k in zip(self.head, self.hint_stages)]
        # ReviewKD: the stages shallow → deep, then the pooled embedding as a 1x1 map
        return logits, feats, pooled, self.head(feats + [pooled[:, :, None, None]])


def build_head(args, student, teacher):
    """The trainable module that maps student features onto the teacher's, sized by a dry run at --image-size."""
    if args.loss not in ("fitnet", "reviewkd"):
        return None
    with torch.no_grad():
        x = torch.zeros(2, 3, args.image_size, args.image_size)
        _, s_feats, s_pooled = forward_features(student.eval(), x)
        _, t_feats, t_pooled = forward_features(teacher.eval(), x)
    student.train()
    if args.loss == "fitnet":   # the official FitNet: a bias-free 1x1 conv per hinted stage, kaiming (fan_out) init
        head = nn.ModuleList(nn.Conv2d(s_feats[k - 1].shape[1], t_feats[k - 1].shape[1], 1, bias=False)
                             for k in args.fitnet_stage)
        for conv in head:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return head
    return ReviewKDFusion([f.shape[1] for f in s_feats] + [s_pooled.shape[1]],
                          [f.shape[1] for f in t_feats] + [t_pooled.shape[1]],
                          [f.shape[-1] for f in t_feats] + [1], mid_channels=256)


def load_teacher(args, num_classes):
    """The frozen teacher from --teacher-ckpt or --teacher-weights (parse_args checked the name); random weights
    with neither, which only --benchmark allows. Every failure stops here, before the student is built."""
    teacher = MODELS[args.teacher](num_classes=num_classes).eval().requires_grad_(False)
    if args.teacher_ckpt:
        what = f"--teacher-ckpt {args.teacher_ckpt}"
        state_dict = load_state_dict(args.teacher_ckpt, "--teacher-ckpt")
        classes = len(state_dict["fc.weight"]) if "fc.weight" in state_dict else num_classes
    elif args.teacher_weights:   # the class count is known offline, before the download
        weights = torchvision.models.get_model_weights(args.teacher)[args.teacher_weights]
        classes, what = len(weights.meta["categories"]), f"torchvision's {args.teacher} {args.teacher_weights}"
    else:
        return teacher
    if classes != num_classes:
        raise UserError(f"the teacher ({what}) predicts {classes} classes but the data has {num_classes}; use a "
                        "teacher trained on the same class folders")
    if args.teacher_weights:   # downloads (once) into the torch hub cache
        try:
            state_dict = weights.get_state_dict(progress=False)
        except Exception as err:   # offline, proxy, corrupt cache: one sentence, before any training
            raise UserError(f"could not download {what} ({err}); run where the network is reachable or pass "
                            "--teacher-ckpt") from err
    load_weights(teacher, state_dict, what)
    return teacher


# ---- data: ImageFolder trees, or one synthetic batch for --benchmark ---------------------------------------------

class BadImage(Exception):   # raised in a DataLoader worker, where a UserError (a SystemExit) would not be caught
    pass


class Images(torchvision.datasets.ImageFolder):
    """ImageFolder whose unreadable files (truncated, empty, not an image) raise BadImage with their path, or with
    skip=True are flagged in `bad` (shared with the DataLoader workers, counted by main) and replaced by the next."""

    def __init__(self, root, transform, skip):
        super().__init__(root, transform=transform)
        self.skip, self.bad = skip, torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as err:   # PIL: OSError "Truncated File Read", UnidentifiedImageError, ...
            self.bad[index] = True
            if not self.skip or self.bad.all():
                raise BadImage(f"{path} ({type(err).__name__}: {err})") from None
            return self[(index + 1) % len(self)]
        return self.transform(image), label


def image_folder(args, split, transform):
    path = os.path.join(args.data_dir, split)
    if not os.path.isdir(path):
        raise UserError(f"no {split}/ folder in --data-dir {args.data_dir}; expected {path}/<class>/<image>.JPEG")
    try:
        return Images(path, transform, args.skip_bad_images)
    except FileNotFoundError as err:   # ImageFolder's own message names neither the flag nor the layout
        raise UserError(f"{path} holds no class folders with images ({err}); expected {path}/<class>/<image>.JPEG")


def to_device(images, labels, device):
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":   # channels_last: faster convolutions
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


class RandomInterpolationCrop(transforms.RandomResizedCrop):
    """timm's RandomResizedCropAndInterpolation with its 'random' interpolation (the official code's default): bilinear
    or bicubic at random for each image, drawn from torch's RNG (seeded per epoch: --resume replays it)."""

    def forward(self, img):
        self.interpolation = (BILINEAR, BICUBIC)[int(torch.randint(2, ()))]
        return super().forward(img)


def load_data(args, rank, world_size, device):
    """(train_loader, val_loader, num_classes). Training: a DistributedSampler (disjoint shards, reshuffled by
    set_epoch); None with --eval-only. Validation: images rank::world_size, no padding, so each counts once.
    With --benchmark: one synthetic batch of the real shapes, already on the device, repeated (no val loader)."""
    if args.benchmark:   # what the model allows: no decoding, no host-to-device copies; ImageNet's 1000 classes
        gen = seeded("synthetic", args.seed, rank)
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
        labels = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        return [to_device(images, labels, device)] * max(args.benchmark, 5), None, 1000
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir} does not exist; point it at a folder holding "
                        "train/<class>/*.JPEG and val/<class>/*.JPEG")
    normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # ImageNet's mean and std
    eval_tf = transforms.Compose([transforms.Resize(int(args.image_size / args.crop_fraction),
                                                    interpolation=EVAL_INTERPOLATION[args.model]),
                                  transforms.CenterCrop(args.image_size), transforms.ToTensor(), normalize])
    val_set = image_folder(args, "val", eval_tf)
    loader_args = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world_size)), shuffle=False,
                            persistent_workers=args.workers > 0, **loader_args)
    if args.eval_only:
        return None, val_loader, len(val_set.classes)
    train_tf = transforms.Compose([RandomInterpolationCrop(args.image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    train_set = image_folder(args, "train", train_tf)
    if train_set.classes != val_set.classes:
        raise UserError(f"train/ has {len(train_set.classes)} classes and val/ has {len(val_set.classes)} (or "
                        f"different names) in --data-dir {args.data_dir}; both need the same class folders")
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    # drop_last: a last batch of one image would break BatchNorm. Workers are not persistent: each epoch's workers
    # draw their seeds from the main process's RNG, seeded per epoch in train_one_epoch, so --resume replays them
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **loader_args)
    if len(train_loader) == 0:
        raise UserError(f"train/ has {len(train_set)} images, fewer than one batch of {args.batch_size} per "
                        f"process on {world_size} process(es); lower --batch-size")
    return train_loader, val_loader, len(val_set.classes)


# ---- loss: one if/elif over --loss, calling common.py ------------------------------------------------------------
LOSSES = ["ce", "kd", "fitnet", "rkd", "reviewkd", "dkd", "augconf", "adaptconf"]


def loss_terms(args, epoch, student_out, teacher_out, labels):
    """{term: scalar} whose sum is the training loss. student_out = StudentWithHead's (logits, stage features,
    pooled, head output); teacher_out = forward_features of the teacher (logits, features, pooled), None for ce."""
    logits, feats, pooled, head_out = student_out
    terms = {}
    if args.gt_weight > 0:
        terms["gt"] = args.gt_weight * F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
    if args.loss == "ce":
        return terms
    t_logits, t_feats, t_pooled = teacher_out
    if args.loss == "kd":
        terms["kd"] = args.kd_weight * kd_loss(logits, t_logits, T=args.kd_T)
    elif args.loss == "augconf":      # Eq. 1, α ramps over the first 30% of epochs
        alpha = augconf_alpha(epoch, args.epochs, args.alpha_max)
        terms["augconf"] = args.kd_weight * augconf_loss(logits, t_logits, alpha, T=args.kd_T)
    elif args.loss == "adaptconf":    # Eq. 2, per-sample β (detached), no warm-up in the classification code
        terms["adaptconf"] = args.kd_weight * adaptconf_loss(logits, t_logits, tau=args.tau, T=args.kd_T)
    elif args.loss == "dkd":
        # mdistiller counts epochs from 1: with --dkd-warmup 1 the full DKD term applies from the first epoch
        warmup = min((epoch + 1) / args.dkd_warmup, 1.0) if args.dkd_warmup > 0 else 1.0
        terms["dkd"] = warmup * dkd_loss(logits, t_logits, labels, args.dkd_alpha, args.dkd_beta, T=args.dkd_T)
    elif args.loss == "fitnet":
        terms["fitnet"] = args.fitnet_weight * sum(hint_loss(h, t_feats[k - 1])   # MSE per hinted stage, summed
                                                   for h, k in zip(head_out, args.fitnet_stage))
    elif args.loss == "rkd":          # distance 25 + angle 50 on the pooled embeddings
        terms["rkd"] = rkd_loss(pooled, t_pooled)
    elif args.loss == "reviewkd":
        terms["reviewkd"] = args.reviewkd_weight * hcl_loss(head_out, t_feats + [t_pooled[:, :, None, None]])
    else:
        raise ValueError(f"unknown --loss {args.loss}; choose one of {', '.join(LOSSES)}")
    if args.gt_weight == 0 and args.loss in ("fitnet", "rkd", "reviewkd"):
        # teacher-only training: a feature loss gives the classifier no signal, so the student also learns the
        # teacher's logits (the same choice as cifar.py and transfer.py)
        terms["kd"] = args.kd_weight * kd_loss(logits, t_logits, T=args.kd_T)
    return terms


# ---- training and evaluation -------------------------------------------------------------------------------------

def lr_at(args, epoch, world_size):
    """timm's StepLRScheduler as the official code builds it (per epoch, warm-up not a prefix): linear from --warmup-lr
    over --warmup-epochs, then --lr (at a global batch of 512, scaled linearly with the actual one) x0.1 every 30
    epochs counted from 0."""
    lr = args.lr * args.batch_size * world_size / 512
    if epoch < args.warmup_epochs:
        return args.warmup_lr + epoch * (lr - args.warmup_lr) / args.warmup_epochs
    return lr * 0.1 ** (epoch // 30)


def param_groups(model, weight_decay):
    """timm's param_groups_weight_decay: no weight decay on 1-D parameters (BatchNorm) and biases."""
    groups = [{"params": [], "weight_decay": 0.0}, {"params": [], "weight_decay": weight_decay}]
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[p.ndim > 1 and not name.endswith(".bias")]["params"].append(p)
    return groups


def train_one_epoch(args, model, teacher, optimizer, loader, epoch, rank, device, max_steps=None):
    """One pass over this process's shard (or its first max_steps batches). Returns epoch means over all processes:
    {loss, loss_<term>, train_images} (+ train_beta_* for adaptconf). The terms stay on the device until the end."""
    # torchvision's transforms draw from the global torch RNG (DataLoader workers are seeded from it when the
    # iterator starts): seeded by (seed, rank, epoch), so --resume replays the augmentation exactly
    torch.manual_seed(seeded("train", args.seed, rank, epoch).initial_seed())
    model.train()
    sums, images_seen, betas = {}, 0, torch.zeros(13, device=device)   # betas: summed common.beta_counts
    world_size = dist.get_world_size() if dist.is_initialized() else 1   # for the images/s of the progress lines
    progress = Progress(rank, min(len(loader), max_steps or len(loader)), args.batch_size * world_size,
                        1 if max_steps else args.epochs - epoch)
    for step, (images, labels) in enumerate(itertools.islice(loader, max_steps), 1):
        images, labels = to_device(images, labels, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            with torch.no_grad():   # the frozen teacher; None for ce
                teacher_out = forward_features(teacher, images) if teacher is not None else None
            student_out = model(images)
            terms = loss_terms(args, epoch, student_out, teacher_out, labels)
            loss = sum(terms.values())
            if args.loss == "adaptconf":   # Figure 3: β of the training batch (Eq. 2), from the same logits
                betas += beta_counts(adaptconf_beta(student_out[0], teacher_out[0], tau=args.tau))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}.items():
            sums[name] = sums.get(name, 0) + value.detach().float() * len(labels)
        images_seen += len(labels)
        progress.step(step)
    totals = all_reduce_sum(torch.stack([*sums.values(), torch.tensor(float(images_seen), device=device)])).tolist()
    record = {name: total / totals[-1] for name, total in zip(sums, totals)}
    check_finite(record, epoch)
    record["train_images"] = int(totals[-1])
    if args.loss == "adaptconf":
        record.update(beta_summary(all_reduce_sum(betas), "train_beta"))
    return record


@torch.no_grad()
def evaluate(args, model, loader, device):
    """Exact {top1, top5, val_loss, images} over the whole val set: each process counts its own shard, then the
    counts are summed."""
    model.eval()
    counts = torch.zeros(4, device=device, dtype=torch.float64)   # top-1 hits, top-5 hits, Σ CE, images
    # float32 throughout, no autocast and no TF32 convolutions: GPU and CPU evaluations agree (bf16 logits tie or
    # swap the top class for ~1% of images)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):
        for images, labels in loader:
            images, labels = to_device(images, labels, device)
            logits = model(images).float()
            counts[:2] += topk_correct(logits, labels, topk=(1, 5)).double()
            counts[2] += F.cross_entropy(logits, labels, reduction="sum").double()
            counts[3] += len(labels)
    top1, top5, loss, images = all_reduce_sum(counts).tolist()
    return {"top1": 100 * top1 / images, "top5": 100 * top5 / images, "val_loss": loss / images, "images": int(images)}


def main(args):
    rank, world_size, device = setup_distributed()
    try:
        start_time = time.time()
        torch.backends.cudnn.benchmark = True       # fixed input sizes: let cuDNN pick its fastest kernels
        ckpt = None if args.benchmark or args.eval_only else open_run(args, rank)   # before any data is read
        if args.out and (args.benchmark or args.eval_only):   # one file each, beside what --out holds
            if args.eval_only and os.path.exists(f"{args.out}/results.json") and not args.overwrite:
                raise UserError(f"--out {args.out} holds results.json; pass --overwrite to replace it or another --out")
            make_out(args.out)
        train_loader, val_loader, num_classes = load_data(args, rank, world_size, device)
        memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format   # as to_device's
        if args.eval_only:
            net = MODELS[args.model](num_classes=num_classes)
            load_weights(net, load_state_dict(args.eval_only, "--eval-only"), f"--eval-only {args.eval_only}")
            result = evaluate(args, net.to(device, memory_format=memory_format), val_loader, device)
            if rank == 0:
                print(f"eval {args.eval_only}: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  "
                      f"({result['images']} images)", flush=True)
                if args.out:
                    write_text(json.dumps({**result, **run_info(world_size, device), "args": vars(args)}, indent=2),
                               f"{args.out}/results.json")
            return result

        teacher = load_teacher(args, num_classes) if args.loss != "ce" else None   # a bad teacher stops us now
        torch.manual_seed(args.seed)   # the same student initialisation whatever the loss and the teacher
        net = MODELS[args.model](num_classes=num_classes)
        raw_model = StudentWithHead(net, build_head(args, net, teacher), args.fitnet_stage)
        raw_model.to(device, memory_format=memory_format)
        if teacher is not None:
            teacher.to(device, memory_format=memory_format)
        optimizer = torch.optim.SGD(param_groups(raw_model, 1e-4), lr=lr_at(args, 0, world_size), momentum=0.9,
                                    nesterov=True)   # appendix A.1; timm's "sgd" is Nesterov
        model = raw_model if world_size == 1 else \
            DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
        hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        run = f"{args.model} <- {args.teacher if teacher is not None else 'labels'} ({args.loss}), batch " \
              f"{args.batch_size}x{world_size} at {args.image_size} px, {num_classes} classes, on {hardware}"
        if rank == 0:
            print(f"{run}: lr {lr_at(args, 0, world_size):.4g}", flush=True)

        if args.benchmark:   # the ordinary training step on synthetic images: 5 warm-up steps, then STEPS timed
            train_one_epoch(args, model, teacher, optimizer, train_loader, 0, rank, device, max_steps=5)
            start = time.perf_counter()   # (the floats train_one_epoch returns have synchronised the device)
            train_one_epoch(args, model, teacher, optimizer, train_loader, 0, rank, device, max_steps=args.benchmark)
            seconds = time.perf_counter() - start
            result = {"images_per_s": args.benchmark * args.batch_size * world_size / seconds,
                      "ms_per_step": 1000 * seconds / args.benchmark, "device": hardware, "world_size": world_size,
                      "args": vars(args)}
            if rank == 0:
                print(f"benchmark: {run}: {result['images_per_s']:.0f} images/s, "
                      f"{result['ms_per_step']:.1f} ms/step", flush=True)
                if args.out:
                    write_text(json.dumps(result, indent=2), f"{args.out}/benchmark.json")
            return result

        start_epoch, best, teacher_top1 = 0, {"top1": 0.0, "top5": 0.0, "epoch": -1}, None
        checkpoint_path = f"{args.out}/checkpoint.pt" if args.out else None
        if ckpt is not None:   # open_run checked that the arguments are the same
            load_weights(net, ckpt["model"], f"--resume {checkpoint_path}")
            if raw_model.head is not None:
                raw_model.head.load_state_dict(ckpt["head"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, best, teacher_top1 = ckpt["epoch"], ckpt["best"], ckpt["teacher_top1"]
        elif teacher is not None:   # check the teacher on the same crop before spending GPU-days (the paper's pairs
            # share their eval interpolation: resnet18/34 bilinear, mobilenetv1/resnet50 bicubic)
            teacher_top1 = evaluate(args, teacher, val_loader, device)["top1"]
            if rank == 0:
                print(f"teacher {args.teacher}: top1 {teacher_top1:.2f}", flush=True)

        result = evaluate(args, net, val_loader, device) if start_epoch >= args.epochs else None   # a finished run
        for epoch in range(start_epoch, args.epochs):
            epoch_start = time.time()
            train_loader.sampler.set_epoch(epoch)
            lr = lr_at(args, epoch, world_size)
            for group in optimizer.param_groups:
                group["lr"] = lr
            record = {"epoch": epoch, "lr": lr}
            if args.loss == "augconf":
                record["alpha"] = augconf_alpha(epoch, args.epochs, args.alpha_max)
            record.update(train_one_epoch(args, model, teacher, optimizer, train_loader, epoch, rank, device))
            train_seconds = time.time() - epoch_start
            broadcast_buffers(raw_model)
            result = evaluate(args, net, val_loader, device)
            bad = [train_loader.dataset.bad, val_loader.dataset.dataset.bad]   # --skip-bad-images: files replaced
            record.update(result, bad_images=int(all_reduce_sum(sum(b.sum() for b in bad).to(device))),
                          images_per_s=record["train_images"] / train_seconds, seconds=time.time() - epoch_start)
            for b in bad:
                b.zero_()
            if result["top1"] > best["top1"] or best["epoch"] < 0:
                best = {"top1": result["top1"], "top5": result["top5"], "epoch": epoch}
            if rank == 0:
                log_record(args.out, record)
                if checkpoint_path:   # "model" is the bare network: --eval-only and --teacher-ckpt load it
                    head = raw_model.head.state_dict() if raw_model.head is not None else None
                    save_atomic({"model": net.state_dict(), "head": head, "optimizer": optimizer.state_dict(),
                                 "epoch": epoch + 1, "best": best, "teacher_top1": teacher_top1, "args": vars(args)},
                                checkpoint_path)

        summary = {**result, "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
                   "teacher_top1": teacher_top1, "seconds": time.time() - start_time,
                   **run_info(world_size, device), "args": vars(args)}
        if rank == 0:
            print(f"final top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  best top1 {best['top1']:.2f} (epoch "
                  f"{best['epoch']})", flush=True)
            if args.out:
                write_text(json.dumps(summary, indent=2), f"{args.out}/results.json")
        return summary
    except BadImage as err:   # from a DataLoader worker: its message ends with ours
        path = str(err).strip().splitlines()[-1].split("BadImage: ")[-1]
        raise UserError(f"cannot read the image {path}; replace or delete it, or pass --skip-bad-images") from None
    finally:
        cleanup_distributed()


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/imagenet", help="ImageFolder root holding train/ and val/")
    g.add_argument("--image-size", type=int, default=224, help="training crop and evaluation crop, in pixels")
    g.add_argument("--crop-fraction", type=float, default=0.95, help="eval: resize to image-size/crop-fraction, "
                   "centre-crop (official 0.95, torchvision 0.875)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per GPU/process")
    g.add_argument("--skip-bad-images", action="store_true", help="replace an unreadable image by the next one and "
                   "count it in the log (bad_images); by default the run stops with the image's path")
    g = p.add_argument_group("models")
    g.add_argument("--model", default="resnet34", choices=sorted(MODELS), help="the student (or the model to train)")
    g.add_argument("--teacher", default=None, choices=sorted(MODELS), help="the weak teacher (any loss but ce)")
    g.add_argument("--teacher-ckpt", default=None, help="teacher weights: checkpoint (ours, mdistiller, torchvision)")
    g.add_argument("--teacher-weights", default=None, help="or a torchvision weights name, e.g. IMAGENET1K_V1")
    g = p.add_argument_group("optimisation (paper appendix A.1)")
    g.add_argument("--epochs", type=int, default=100, help="training epochs; the lr drops x0.1 every 30")
    g.add_argument("--batch-size", type=int, default=64, help="images per process (8 GPUs x 64 = 512)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD lr for a global batch of 512, scaled linearly")
    g.add_argument("--warmup-epochs", type=int, default=3, help="epochs of linear lr warm-up (timm's default)")
    g.add_argument("--warmup-lr", type=float, default=1e-4, help="lr of the first warm-up epoch (timm's default)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the ground-truth CE term")
    g.add_argument("--seed", type=int, default=0, help="seed of the student's initialisation, shuffling, augmentation")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (CPU runs float32)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="ce", choices=LOSSES, help="training loss (Table 4 row)")
    g.add_argument("--gt-weight", type=float, default=1.0, help="weight of CE(s, y); 0 = teacher-only training")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the kd / augconf / adaptconf term")
    g.add_argument("--kd-T", type=float, default=1.0, help="KD temperature (kd, augconf, adaptconf)")
    g.add_argument("--tau", type=float, default=0.5, help="adaptconf: temperature of beta (Eq. 2)")
    g.add_argument("--alpha-max", type=float, default=0.5, help="augconf: final alpha of Eq. 1")
    g.add_argument("--dkd-alpha", type=float, default=1.0, help="dkd: weight of TCKD")
    g.add_argument("--dkd-beta", type=float, default=2.0, help="dkd: weight of NCKD (official code 2)")
    g.add_argument("--dkd-T", type=float, default=1.0, help="dkd: temperature (official code 1)")
    g.add_argument("--dkd-warmup", type=int, default=0, help="dkd: epochs of linear warm-up (official 0; mdistiller 1)")
    g.add_argument("--fitnet-stage", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4],
                   help="fitnet: the hinted stages, 1-4 (official: all four)")
    g.add_argument("--fitnet-weight", type=float, default=1.0, help="fitnet: weight of the summed hint MSEs (official)")
    g.add_argument("--reviewkd-weight", type=float, default=1.0, help="reviewkd: weight of HCL (mdistiller ImageNet)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder for log.jsonl, results.json, checkpoint.pt")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt, or "
                   "start afresh where there is none (one command for the first launch and every restart)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate these weights on val/, write "
                   "results.json into --out (--overwrite replaces one), stop")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS", help="time STEPS training steps on synthetic "
                   "images (no data read; a teacher without weights has random ones), print images/s, write "
                   "benchmark.json into --out (beside anything there), stop")
    args = p.parse_args(argv)
    check_numbers(p, args)
    if args.gt_weight <= 0 and args.loss in ("ce", "dkd"):   # dkd splits the distributions at the true class
        p.error(f"--loss {args.loss} needs labels: use --gt-weight > 0, or another loss for teacher-only training")
    if args.loss != "ce" and not args.eval_only:
        given = (args.teacher_ckpt is not None) + (args.teacher_weights is not None)
        if args.teacher is None or given > 1 or (given == 0 and not args.benchmark):
            p.error(f"--loss {args.loss} distils from a teacher: pass --teacher and exactly one of --teacher-ckpt "
                    "PATH or --teacher-weights NAME (with --benchmark, at most one)")
        names = [] if args.teacher == "mobilenetv1" else \
            list(torchvision.models.get_model_weights(args.teacher).__members__)   # torchvision has no MobileNetV1
        if args.teacher_weights is not None and args.teacher_weights not in names:
            p.error(f"torchvision has no weights '{args.teacher_weights}' for {args.teacher} (choose from {names}); "
                    "pass a checkpoint with --teacher-ckpt")
    return args


if __name__ == "__main__":
    main(parse_args())
