"""Weak-to-strong few-shot learning, Tables 5 and 6 of "Vision Superalignment" (arXiv 2402.03749): Meta-Baseline
(Chen et al. 2021) on miniImageNet, a weak ResNet-12/18 teacher supervising a strong ResNet-36 student in the
classifier stage (linear head over the 64 training classes, Table 5) and in the meta stage (5-way episodes, logits =
learnable scale × cosine to the class-mean prototypes, Table 6). Every model is scored on seeded 5-way 1-shot and
5-shot test episodes with 15 queries per class: mean accuracy ± 95% confidence interval (1.96·std/√episodes).

  torchrun --nproc_per_node=4 fewshot.py --stage classifier --model resnet36 --loss adaptconf --batch-size 32 \
      --teacher resnet12 --teacher-ckpt runs/cls_r12/checkpoint.pt --data-dir data/miniimagenet --out runs/cls_ac
  python fewshot.py --stage meta --model resnet36 --init runs/cls_r36/checkpoint.pt --loss adaptconf \
      --teacher resnet12 --teacher-ckpt runs/cls_r12/checkpoint.pt --data-dir data/miniimagenet --out runs/meta_ac
  python fewshot.py --model resnet36 --eval-only CKPT --data-dir data/miniimagenet --out runs/eval

Paper (5-way %, 3 trials): Table 5 (classifier stage, test split), ResNet-36 from scratch 60.91 (1-shot) / 79.01
(5-shot), AdaptConf from a ResNet-12 teacher 61.50 / 79.52; Table 6 (meta stage, 1-shot, val split at the best epoch
as Meta-Baseline's max-va), 65.08 from scratch, AdaptConf from a class-stage ResNet-12 65.38. Episodes are the
official ones (np.random.seed(--episode-seed), then Meta-Baseline's sampler): 800 val per shot every epoch (meta
stage: 800 test too, logged), 8,000 test at the end. Where the official code (few_shot_leaerning/) leaves room:
  - Table 5 is read from the last epoch's 8,000 test episodes (train_classifier.py logs 800 every 5 epochs).
  - The meta-stage teacher is its encoder + a prototype classifier of scale 10 (the official code loads the encoder).
  - RKD acts on the pooled features of every image of a step (the batch, or all images of the episodes).
  - Evaluation embeds each image once (eval mode, float32), then scores the episodes on those features: same accuracies.
  - Training episodes come from a generator seeded per (seed, rank, epoch) (official: np.random.seed(epoch)).
  - Images are resized to 80x80 as in Meta-Baseline (the paper says 84: --image-size 84).
"""
import argparse
import functools
import hashlib
import json
import math
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import common

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


# ---- models: the ResNets of Meta-Baseline and of the official few-shot code ----------------------------------------

class Block(nn.Module):
    """3 × (3x3 conv, BN, LeakyReLU 0.1), the last activation after the residual sum; a 1x1 conv + BN shortcut and a
    2x2 max-pool in the first block of a stage (Meta-Baseline's ResNet-12 block)."""

    def __init__(self, in_channels, channels, first_in_stage):
        super().__init__()
        self.relu = nn.LeakyReLU(0.1)
        self.conv1, self.bn1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv3, self.bn3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
                           if first_in_stage else None)
        self.maxpool = nn.MaxPool2d(2) if first_in_stage else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.relu(out + (self.downsample(x) if self.downsample is not None else x))
        return self.maxpool(out) if self.maxpool is not None else out


class ResNet(nn.Module):
    """Four stages of widths w·(1, 2, 4, 8) (w = 64 in the paper), global average pool → (B, 8w) features.

    ResNet-12 keeps Meta-Baseline's module names (layerK is a Block, e.g. layer1.conv1.weight); deeper ResNets stack
    blocks in nn.Sequential (layer1.0.conv1.weight) as the official code's ResNet-18/36 do, so their checkpoints load
    (its ResNet-12, `resnet12_bottle`, has layer1.0.*: read_weights renames them)."""

    def __init__(self, blocks_per_stage, width=64):
        super().__init__()
        in_channels = 3
        for k, (blocks, channels) in enumerate(zip(blocks_per_stage, (width, 2 * width, 4 * width, 8 * width))):
            stage = [Block(in_channels if i == 0 else channels, channels, first_in_stage=i == 0) for i in range(blocks)]
            self.add_module(f"layer{k + 1}", stage[0] if blocks_per_stage == (1, 1, 1, 1) else nn.Sequential(*stage))
            in_channels = channels
        self.out_dim = in_channels
        for m in self.modules():   # BatchNorm: PyTorch's initialisation (1, 0) is the one the official code sets
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.flatten(2).float().mean(dim=2)                            # (B, 8w), float32 also under bf16


# parameter counts at width 64: 7,996,800 / 10,210,944 / 23,159,040 (tests/test_fewshot.py checks them)
MODELS = {
    "resnet12": lambda width: ResNet((1, 1, 1, 1), width),
    "resnet18": lambda width: ResNet((1, 2, 2, 1), width),
    "resnet36": lambda width: ResNet((2, 3, 5, 2), width),
}


def prototype_logits(support, query, scale):
    """support (E, N, K, D), query (E, M, D) → (E, M, N) logits: scale · cos(query, mean of each class's support)."""
    with torch.autocast(support.device.type, enabled=False):             # cosines in float32, also under bf16
        prototypes = F.normalize(support.float().mean(dim=2), dim=-1)     # (E, N, D)
        query = F.normalize(query.float(), dim=-1)                        # (E, M, D)
        return scale * torch.bmm(query, prototypes.transpose(1, 2))


class Classifier(nn.Module):
    """Classifier stage: encoder + linear head over the training classes. forward → (logits (B, C), features)."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, num_classes)

    def forward(self, images):
        features = self.encoder(images)
        with torch.autocast(images.device.type, enabled=False):   # float32 logits: they feed β (Eq. 2), no bf16 ties
            return self.head(features.float()), features


class MetaBaseline(nn.Module):
    """Meta stage: encoder + prototype classifier with a learnable scale (init 10).

    forward(images, way, shot, query): images (E·way·(shot+query), 3, H, W) ordered episode → class → image with
    the `shot` support images of each class first; returns (query logits (E·way·query, way), features)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, images, way, shot, query):
        features = self.encoder(images)                                    # (E·way·(shot+query), D)
        per_episode = features.view(-1, way, shot + query, features.shape[-1])
        queries = per_episode[:, :, shot:].reshape(len(per_episode), way * query, -1)
        logits = prototype_logits(per_episode[:, :, :shot], queries, self.scale)
        return logits.reshape(-1, way), features


def read_weights(path, flag, model):
    """A checkpoint's state_dict in this script's names for the backbone `model`: ours, or Meta-Baseline's / the
    official code's {"model_sd": ..., "config": ..., "training": ...} (classifier.linear.* → head.*, temp → scale),
    weights only. A ResNet-12 may be the official `resnet12_bottle` (one block in an nn.Sequential: layerK.0.* →
    layerK.*, the same network as Meta-Baseline's `resnet12`)."""
    raw = read_checkpoint(path, flag)
    official = isinstance(raw, dict) and isinstance(raw.get("model_sd"), dict)
    state = {}
    for name, tensor in (raw["model_sd"] if official else load_state_dict(path, flag)).items():
        for old, new in (("classifier.linear.", "head."), ("temp", "scale")) if official else ():
            name = new + name[len(old):] if name.startswith(old) else name
        state[re.sub(r"\b(layer[1-4])\.0\.", r"\1.", name) if model == "resnet12" else name] = tensor
    return state


def encoder_weights(path, flag, model):   # the encoder.* tensors of a checkpoint of either stage, without the prefix
    encoder = {k[len("encoder."):]: v for k, v in read_weights(path, flag, model).items() if k.startswith("encoder.")}
    if not encoder:
        raise UserError(f"{flag} {path} holds no 'encoder.*' tensors; pass a checkpoint of fewshot.py or Meta-Baseline "
                        "(either stage)")
    return encoder


def load_teacher(args, num_classes, device):
    """The frozen teacher: classifier stage, encoder + linear head (its logits over the same training classes, so a
    classifier-stage checkpoint); meta stage, encoder + prototype classifier of scale 10, as the official code (which
    loads only the teacher's encoder). Without --teacher-ckpt (only with --benchmark) its weights are random."""
    encoder = MODELS[args.teacher](args.width)
    teacher = Classifier(encoder, num_classes) if args.stage == "classifier" else MetaBaseline(encoder)
    if args.teacher_ckpt and args.stage == "classifier":
        state = read_weights(args.teacher_ckpt, "--teacher-ckpt", args.teacher)
        if "head.weight" not in state:
            raise UserError(f"--teacher-ckpt {args.teacher_ckpt} has no linear head; the classifier stage needs a "
                            "classifier-stage teacher")
        load_weights(teacher, {k: v for k, v in state.items() if k.startswith(("encoder.", "head."))},
                     f"--teacher-ckpt {args.teacher_ckpt}")
    elif args.teacher_ckpt:
        load_weights(encoder, encoder_weights(args.teacher_ckpt, "--teacher-ckpt", args.teacher),
                     f"--teacher-ckpt {args.teacher_ckpt}")
    return teacher.to(device, memory_format=layout(device)).eval().requires_grad_(False)


def layout(device):
    """channels_last on CUDA (faster bf16 convolutions), the default layout on CPU."""
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


# ---- data: miniImageNet held in memory as uint8, augmentation as batched tensor ops ---------------------------------

def load_split(data_dir, split, image_size):
    """(images uint8 (N, 3, S, S), labels long (N,) in 0..C-1, images_by_class(labels)) of one split, from
    miniImageNet_category_split_<name>.pickle or from the folder <data_dir>/<split>/<class>/<image>."""
    name = "train_phase_train" if split == "train" else split
    pickle_path = os.path.join(data_dir, f"miniImageNet_category_split_{name}.pickle")
    folder = os.path.join(data_dir, split)
    if os.path.isfile(pickle_path):
        try:
            with open(pickle_path, "rb") as f:
                pack = pickle.load(f, encoding="latin1")
        except Exception:   # truncated or not a pickle
            pack = None
        if not isinstance(pack, dict) or "data" not in pack or "labels" not in pack:
            raise UserError(f"{pickle_path} is not a miniImageNet pickle (a dict with 'data' and 'labels'); "
                            "re-download it")
        images = torch.from_numpy(np.ascontiguousarray(pack["data"])).permute(0, 3, 1, 2)   # (N, 3, 84, 84)
        labels = np.asarray(pack["labels"])
    elif os.path.isdir(folder):
        classes = sorted(c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c)))
        arrays, labels = [], []
        for k, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(folder, name))):
                try:   # every image is decoded here, before training: an unreadable one stops the run, named
                    with Image.open(os.path.join(folder, name, file)) as img:
                        arrays.append(np.asarray(resize_center_crop(img.convert("RGB"), image_size)))
                except (OSError, ValueError) as e:
                    raise UserError(f"cannot read the image {os.path.join(folder, name, file)} ({e}); replace or "
                                    "remove it") from None
                labels.append(k)
        if not arrays:
            raise UserError(f"{folder} holds no class folders with images; expected {folder}/<class>/<image>")
        images, labels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), np.asarray(labels)
    else:
        raise UserError(f"the {split} split is missing: neither {pickle_path} nor the folder {folder} exists; "
                        "point --data-dir at the miniImageNet pickles or at a folder with train/ val/ test/")
    if images.shape[-2:] != (image_size, image_size):                     # 84 → 80 as Meta-Baseline's Resize(80)
        images = torch.cat([F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear",
                                          antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
                            for chunk in images.split(1024)])
    _, labels = np.unique(labels, return_inverse=True)                     # e.g. 64..79 → 0..15
    labels = torch.from_numpy(labels.astype(np.int64))
    return images.contiguous(), labels, images_by_class(labels)


def resize_center_crop(img, size):
    """PIL image → (size, size, 3) uint8: shorter side to `size`, then the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def images_by_class(labels):
    """List over classes of the (n_c,) numpy arrays of image indices."""
    labels = labels.numpy()
    return [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]


def check_episodes(split, per_class, way, images_per_class):
    if len(per_class) < way:
        raise UserError(f"the {split} split has {len(per_class)} classes, fewer than the {way} an episode needs; "
                        "lower --way or use a larger split")
    smallest = min(len(c) for c in per_class)
    if smallest < images_per_class:
        raise UserError(f"a class of the {split} split has only {smallest} images, but an episode needs shot + query "
                        f"= {images_per_class} per class; lower --query or use a larger split")


def sample_episode(rng, per_class, way, shot, query):
    """(way, shot + query) image indices: `way` distinct classes, shot + query distinct images of each; the first
    `shot` columns are the support set, the rest the queries."""
    classes = rng.choice(len(per_class), way, replace=False)
    return np.stack([rng.choice(per_class[c], shot + query, replace=False) for c in classes])


@functools.cache
def mean_std(device):
    """ImageNet's mean and std, (1, 3, 1, 1) on `device`, made once rather than copied at every batch."""
    return (torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1),
            torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1))


def normalize(images_uint8):
    mean, std = mean_std(images_uint8.device)
    return (images_uint8.float().div_(255) - mean) / std


def random_resized_crop_flip(x, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Batched RandomResizedCrop (to the input size) + horizontal flip on (B, 3, S, S) float images: one random box
    per image, resampled bilinearly with affine_grid/grid_sample. Boxes that would leave the image are clipped."""
    b = len(x)
    u = torch.rand(b, 5, generator=generator, device=x.device)             # drawn where the images are: no copy
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)                     # box width / image width
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)      # box centre in [-1, 1] coordinates
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def classifier_batches(train, args, epoch, rank, world_size, device):
    """Classifier stage: yields (augmented images, labels, {}) of this rank's shard of a per-epoch permutation."""
    images, labels, _ = train
    order = torch.randperm(len(labels), generator=seeded("shuffle", args.seed, epoch))
    order = order[: len(order) // world_size * world_size][rank::world_size]   # equal step counts on all ranks
    order, labels = order.to(images.device), labels.to(images.device)   # one copy an epoch, no host sync every step
    augment = seeded("augment", args.seed, rank, epoch, device=images.device)   # boxes drawn beside the images
    for start in range(0, len(order), args.batch_size):
        idx = order[start:start + args.batch_size]
        x = random_resized_crop_flip(normalize(images[idx]), augment)
        yield x.to(device, non_blocking=True, memory_format=layout(device)), labels[idx].to(device), {}


def episode_batches(train, args, epoch, rank, device, steps):
    """Meta stage: yields `steps` batches of --episodes-per-batch training episodes (no augmentation)."""
    images, _, per_class = train
    rng = np.random.default_rng(seeded("episodes", args.seed, rank, epoch).initial_seed())   # own episodes per rank
    # (E·way·query,) query labels in MetaBaseline's order: episode by episode, class 0's queries, then class 1's, ...
    labels = torch.arange(args.way, device=device).repeat_interleave(args.query).repeat(args.episodes_per_batch)
    shape = dict(way=args.way, shot=args.shot, query=args.query)
    for _ in range(steps):
        idx = np.concatenate([sample_episode(rng, per_class, args.way, args.shot, args.query).reshape(-1)
                              for _ in range(args.episodes_per_batch)])
        idx = torch.from_numpy(idx)
        idx = idx.pin_memory() if images.device.type == "cuda" else idx    # pinned: the copy does not wait for the GPU
        x = normalize(images[idx.to(images.device, non_blocking=True)])
        yield x.to(device, non_blocking=True, memory_format=layout(device)), labels, shape


def load_data(args, rank, world_size, device):
    """(train, val, test) splits, each (images uint8 (N, 3, S, S), labels (N,), images_by_class(labels)); test is
    the --eval-split. --eval-only reads only that one (train = val = None); --benchmark returns a synthetic training
    split of random images of the real shapes (64 classes, enough images for STEPS steps) and val = test = None."""
    if args.benchmark:
        n = 64 * max(600, math.ceil(args.benchmark * args.batch_size * world_size / 64))
        images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device,
                               generator=seeded("synthetic", args.seed, device=device))
        labels = torch.arange(64).repeat_interleave(n // 64)
        return (images, labels, images_by_class(labels)), None, None
    train = val = None
    if not args.eval_only:
        train, val = (load_split(args.data_dir, split, args.image_size) for split in ("train", "val"))
        if args.stage == "meta":
            check_episodes("train", train[2], args.way, args.shot + args.query)
        check_episodes("val", val[2], args.way, 5 + args.query)
        if device.type == "cuda":   # the whole training split on the GPU as uint8 (miniImageNet: 0.74 GB at 80x80)
            train = (train[0].to(device), *train[1:])
    test = (val if val is not None and args.eval_split == "val" else
            load_split(args.data_dir, args.eval_split, args.image_size))
    check_episodes(args.eval_split, test[2], args.way, 5 + args.query)
    return train, val, test


# ---- loss: Eq. 2 of the paper and its baselines, from common.py ------------------------------------------------------

def beta_scale(args, epoch):
    """The warm-up of β (AdaptConf) and α (AugConf) in the official few-shot code (both stages), which counts epochs
    from 1: e / (0.25·E) while e < int(0.25·E), then 1 (E = 20: 0.2, 0.4, 0.6, 0.8, then 1)."""
    e = epoch + 1
    return e / (0.25 * args.epochs) if e < int(0.25 * args.epochs) else 1.0


def loss_terms(args, epoch, student_out, teacher_out, labels):
    """{term: scalar}, summed into the training loss: gt = w_gt·CE(s, y), then w_kd·(the teacher term). The outputs
    are (logits, pooled features): logits over the training classes (classifier stage) or of the queries (meta)."""
    logits, features = student_out
    terms = {"gt": args.gt_weight * F.cross_entropy(logits.float(), labels)}
    if args.loss == "ce":
        return terms
    t_logits, t_features = teacher_out
    if args.loss == "kd":
        term = common.kd_loss(logits, t_logits, T=args.kd_T)
    elif args.loss == "rkd":
        term = common.rkd_loss(features, t_features)
    elif args.loss == "augconf":   # Eq. 1, α ramped as β (the official aug_conf_loss)
        term = common.augconf_loss(logits, t_logits, args.alpha_max * beta_scale(args, epoch), T=args.kd_T)
    elif args.loss == "adaptconf":   # Eq. 2, β scaled up linearly over the first 25% of epochs
        term = common.adaptconf_loss(logits, t_logits, tau=args.tau, T=args.kd_T, beta_scale=beta_scale(args, epoch))
    else:
        raise ValueError(f"unknown --loss {args.loss!r}; choose ce, kd, rkd, augconf or adaptconf")
    terms[args.loss] = args.kd_weight * term
    return terms


# ---- training and evaluation -----------------------------------------------------------------------------------------

def lr_at(args, epoch):
    """Classifier stage: lr, ×0.1 from --lr-decay-epoch on (default 0.9·epochs, 90 of 100); meta stage: fixed,
    unless --lr-decay-epoch is given."""
    decay = args.lr_decay_epoch if args.lr_decay_epoch is not None or args.stage == "meta" else int(0.9 * args.epochs)
    return args.lr * (0.1 if decay is not None and epoch >= decay else 1.0)


def step_images(args, world_size):   # images of one training step over all processes
    return world_size * (args.batch_size if args.stage == "classifier" else
                         args.episodes_per_batch * args.way * (args.shot + args.query))


def train_one_epoch(args, model, teacher, optimizer, train, epoch, rank, world_size, device, max_steps=None):
    """One epoch of the stage (or its first max_steps steps); returns {lr, loss, loss_<term>, train_acc,
    images_per_s, train_beta_*} averaged over all processes, read from the device once."""
    use_amp = args.amp and device.type == "cuda"
    lr = lr_at(args, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batches = (classifier_batches(train, args, epoch, rank, world_size, device) if args.stage == "classifier" else
               episode_batches(train, args, epoch, rank, device, max_steps or args.batches_per_epoch))
    model.train()
    sums, correct, beta_sums, steps, labelled, seen = {}, 0, 0, 0, 0, 0
    total = (math.ceil(len(train[1]) // world_size / args.batch_size) if args.stage == "classifier" else
             args.batches_per_epoch)                                       # steps of a whole epoch
    progress = Progress(rank, min(total, max_steps or total), step_images(args, world_size),
                        args.epochs - epoch if max_steps is None else 1)
    start = time.time()
    for images, labels, shape in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            student_out = model(images, **shape)                           # (logits, features)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = teacher(images, **shape)
            terms = loss_terms(args, epoch, student_out, teacher_out, labels)
            if args.loss == "adaptconf":   # unscaled β of Eq. 2 for Figure 3 (the loss uses beta_scale·β)
                beta_sums = beta_sums + common.beta_counts(
                    common.adaptconf_beta(student_out[0], teacher_out[0], tau=args.tau))
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value.detach()
        correct = correct + common.topk_correct(student_out[0].float(), labels, topk=(1,))[0]
        steps, labelled, seen = steps + 1, labelled + len(labels), seen + len(images)
        progress.step(steps)                                               # host clocks only
        if steps == max_steps:
            break
    # every process ran as many steps on as many images: divide the sums over processes by world_size·(own counts)
    totals = all_reduce_sum(torch.stack([*sums.values(), correct])).tolist()
    means = {name: total / (steps * world_size) for name, total in zip(sums, totals)}
    check_finite(means, epoch)
    record = {"lr": lr, "loss": sum(means.values()), **{f"loss_{name}": mean for name, mean in means.items()},
              "train_acc": 100 * totals[-1] / (labelled * world_size),
              "images_per_s": seen * world_size / (time.time() - start)}
    if args.loss == "adaptconf":
        record.update(common.beta_summary(all_reduce_sum(beta_sums), "train_beta"),
                      train_beta_scale=beta_scale(args, epoch))
    return record


def episode_accuracies(features, per_class, way, shot, query, episodes, seed, rank, world_size):
    """(episodes,) accuracy of the prototype classifier on each seeded episode. The episodes are those of the official
    code and Meta-Baseline (np.random.seed(seed), then CategoriesSampler's draws one episode after another); every
    rank draws them all, scores episodes r, r + W, ..., and one all-reduce puts every accuracy in place once."""
    accuracies = torch.zeros(episodes, device=features.device, dtype=torch.float64)
    rng = np.random.RandomState(seed)   # the legacy generator that np.random.seed seeds
    drawn = [sample_episode(rng, per_class, way, shot, query) for _ in range(episodes)]
    mine = list(range(rank, episodes, world_size))
    labels = torch.arange(way, device=features.device).repeat_interleave(query)
    for chunk in range(0, len(mine), 256):
        ids = mine[chunk:chunk + 256]
        idx = np.stack([drawn[i] for i in ids])
        f = features[torch.from_numpy(idx).to(features.device)]            # (E, way, shot + query, D)
        logits = prototype_logits(f[:, :, :shot], f[:, :, shot:].reshape(len(ids), way * query, -1), 1.0)
        accuracies[ids] = (logits.argmax(dim=2) == labels).double().mean(dim=1)
    return all_reduce_sum(accuracies)


def mean_ci(accuracies):
    """(mean %, 95% confidence interval %) = 100·mean, 100·1.96·std/sqrt(n) (sample std, ddof 1)."""
    a = np.asarray(accuracies, dtype=np.float64)
    std = a.std(ddof=1) if len(a) > 1 else 0.0
    return float(100 * a.mean()), float(100 * 1.96 * std / math.sqrt(len(a)))   # Python floats: weights-only loads


@torch.no_grad()
def evaluate(args, encoder, split, episodes, rank, world_size, device):
    """Meta-Baseline's evaluation of an encoder on `episodes` seeded 5-way episodes per shot of a split:
    {"1shot", "5shot": mean accuracy %, "1shot_ci", "5shot_ci": 95% CI %, "top1": the 1-shot accuracy (the headline
    of Tables 5 and 6), "images": query images scored per shot (episodes·way·query, each episode by one process)}."""
    broadcast_buffers(encoder)     # every process embeds with rank 0's BatchNorm statistics
    encoder.eval()                 # so an image's feature does not depend on its episode: embed each image once
    images = split[0]
    features = torch.zeros(len(images), encoder.out_dim, device=device)   # (N, D), rows filled by their rank
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):   # float32, no TF32: as on CPU
        for idx in torch.arange(rank, len(images), world_size).split(256):
            x = normalize(images[idx.to(images.device)].to(device))        # uint8 to the device, normalised there
            features[idx.to(device)] = encoder(x.to(memory_format=layout(device)))   # no bf16 autocast
    all_reduce_sum(features)
    result = {}
    for shot in (1, 5):
        accs = episode_accuracies(features, split[2], args.way, shot, args.query, episodes, args.episode_seed, rank,
                                  world_size)
        result[f"{shot}shot"], result[f"{shot}shot_ci"] = mean_ci(accs.cpu().numpy())
    return {"top1": result["1shot"], **result, "images": episodes * args.way * args.query}


def save_results(args, results, rank, world_size, start_time):
    """Adds the run's fields to the test results, prints them and writes <out>/results.json (rank 0)."""
    results.update(split=args.eval_split, episodes=args.test_episodes, seconds=time.time() - start_time,
                   **run_info(world_size, torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                   args=vars(args))
    if rank == 0:
        print(f"{args.eval_split} ({args.test_episodes} episodes): 1-shot {results['1shot']:.2f} ± "
              f"{results['1shot_ci']:.2f}  5-shot {results['5shot']:.2f} ± {results['5shot_ci']:.2f}", flush=True)
        if args.out:
            write_text(json.dumps(results, indent=2), os.path.join(args.out, "results.json"))
    return results


def open_output(args, rank):
    """--eval-only and --benchmark write only results.json / benchmark.json: into any folder but a training run's
    (its results.json would be replaced), created if missing; no open_run, no checkpoint. Returns None."""
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; pass a folder (it is created if missing)")
    if args.out and any(os.path.exists(os.path.join(args.out, f)) for f in ("checkpoint.pt", "log.jsonl")):
        raise UserError(f"--out {args.out} holds a training run; pass another --out for the "
                        f"{'--eval-only' if args.eval_only else '--benchmark'} results")
    if args.out and rank == 0:
        make_out(args.out)


# ---- main ------------------------------------------------------------------------------------------------------------

def main(args):
    rank, world_size, device = setup_distributed()
    try:
        start_time = time.time()
        torch.backends.cudnn.benchmark = True                 # fixed image sizes: cuDNN picks its fastest kernels once
        ckpt = open_output(args, rank) if args.eval_only or args.benchmark else open_run(args, rank)
        train, val, test = load_data(args, rank, world_size, device)
        if args.eval_only:   # the encoder of a checkpoint of either stage (ours, Meta-Baseline's, the official code's)
            encoder = MODELS[args.model](args.width).to(device, memory_format=layout(device))
            load_weights(encoder, encoder_weights(args.eval_only, "--eval-only", args.model),
                         f"--eval-only {args.eval_only}")
            results = evaluate(args, encoder, test, args.test_episodes, rank, world_size, device)
            return save_results(args, {**results, "checkpoint": args.eval_only}, rank, world_size, start_time)

        num_classes = len(train[2])
        torch.manual_seed(args.seed)                          # the same student initialisation for every loss
        encoder = MODELS[args.model](args.width)
        if args.init:                                         # meta stage: the encoder of a classifier-stage run
            load_weights(encoder, encoder_weights(args.init, "--init", args.model),
                         f"--init {args.init} as {args.model}")
        raw_model = Classifier(encoder, num_classes) if args.stage == "classifier" else MetaBaseline(encoder)
        raw_model.to(device, memory_format=layout(device))
        teacher = load_teacher(args, num_classes, device) if args.loss != "ce" else None
        model = raw_model if world_size == 1 else DDP(raw_model, device_ids=[device] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
        images_per_step = step_images(args, world_size)
        source = args.teacher if teacher is not None else "labels"
        if rank == 0:
            print(f"{args.stage} stage: {args.model} <- {source} ({args.loss}), {num_classes} classes, "
                  f"{images_per_step} images a step on {world_size} process(es) on {device}, "
                  f"bf16 {args.amp and device.type == 'cuda'}, lr {args.lr}", flush=True)

        if args.benchmark:   # the ordinary loop on random images: 5 warm-up steps, then STEPS timed steps
            steps = args.benchmark
            train_one_epoch(args, model, teacher, optimizer, train, 0, rank, world_size, device, max_steps=5)
            start = time.time()
            train_one_epoch(args, model, teacher, optimizer, train, 0, rank, world_size, device, max_steps=steps)
            seconds = time.time() - start                     # the returned floats waited for the device
            result = {"images_per_s": images_per_step * steps / seconds, "ms_per_step": 1000 * seconds / steps,
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "world_size": world_size, "args": vars(args)}
            if rank == 0:
                print(f"benchmark: {args.stage} stage, {args.model} <- {source} ({args.loss}), {images_per_step} "
                      f"images a step on {world_size} x {result['device']}: {result['images_per_s']:.0f} images/s, "
                      f"{result['ms_per_step']:.1f} ms/step", flush=True)
                if args.out:
                    write_text(json.dumps(result, indent=2), os.path.join(args.out, "benchmark.json"))
            return result

        start_epoch, best = 0, {"top1": -1.0, "epoch": -1}
        if ckpt is not None:                                  # --resume: open_run checked the arguments
            load_weights(raw_model, ckpt["model"], f"--resume {args.out}")
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, best = ckpt["epoch"], ckpt["best"]
        select = f"{args.shot if args.shot in (1, 5) else 1}shot"   # val at the training shot, as Meta-Baseline
        for epoch in range(start_epoch, args.epochs):
            epoch_start = time.time()
            record = {"epoch": epoch,
                      **train_one_epoch(args, model, teacher, optimizer, train, epoch, rank, world_size, device),
                      **evaluate(args, raw_model.encoder, val, args.val_episodes, rank, world_size, device)}
            record["top1"] = record[select]   # the model-selection metric: picks the best epoch
            if args.stage == "meta":   # as the official train_meta.py, also the test split ("tval") every epoch
                record["scale"] = raw_model.scale.item()
                if test is not val:
                    record.update({f"test_{k}": v for k, v in evaluate(args, raw_model.encoder, test,
                                                                        args.val_episodes, rank, world_size,
                                                                        device).items()})
            record["seconds"] = time.time() - epoch_start
            if record["top1"] > best["top1"]:   # Table 6 reports this epoch's val accuracy
                best = {"top1": record["top1"], "epoch": epoch,
                        **{f"val_{k}": record[k] for k in ("1shot", "1shot_ci", "5shot", "5shot_ci")}}
            if rank == 0:
                log_record(args.out, record)
                if args.out:
                    save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "epoch": epoch + 1, "best": best, "args": vars(args)},
                                os.path.join(args.out, "checkpoint.pt"))

        results = evaluate(args, raw_model.encoder, test, args.test_episodes, rank, world_size, device)
        teacher_top1 = (evaluate(args, teacher.encoder, test, args.test_episodes, rank, world_size, device)["top1"]
                        if teacher is not None else None)     # the teacher on the same test episodes
        if rank == 0:   # Table 6 (meta stage): val at the best epoch; Table 5 (classifier stage): the test line below
            v = lambda key: best.get(key, math.nan)   # a run resumed from before val was kept has none
            print(f"val ({args.val_episodes} episodes), best epoch {best['epoch']}: 1-shot {v('val_1shot'):.2f} ± "
                  f"{v('val_1shot_ci'):.2f}  5-shot {v('val_5shot'):.2f} ± {v('val_5shot_ci'):.2f}", flush=True)
        return save_results(args, {**results, **{f"best_{k}": v for k, v in best.items()},
                                   "teacher_top1": teacher_top1}, rank, world_size, start_time)
    finally:
        cleanup_distributed()


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/miniimagenet", help="miniImageNet pickles, or train/ val/ test/ folders "
                   "(all images are read at the start: an unreadable one stops the run with its path)")
    g.add_argument("--image-size", type=int, default=80, help="images are resized to this square (84 in the paper)")
    g.add_argument("--out", default=None, help="output directory (log.jsonl, results.json, checkpoint.pt)")
    g = p.add_argument_group("model and stage")
    g.add_argument("--stage", default="classifier", choices=["classifier", "meta"], help="Meta-Baseline stage")
    g.add_argument("--model", default="resnet36", choices=sorted(MODELS), help="student backbone")
    g.add_argument("--width", type=int, default=64, help="first-stage channels of every backbone (64; less for tests)")
    g.add_argument("--init", default=None, help="meta stage: classifier-stage checkpoint that initialises the encoder")
    g = p.add_argument_group("optimisation: SGD, momentum 0.9")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 100 classifier stage, 20 meta stage)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="classifier stage: images per step per process (4 GPUs × 32 = the paper's 128)")
    g.add_argument("--lr", type=float, default=None, help="lr (default 0.1 classifier stage, 1e-3 meta stage)")
    g.add_argument("--lr-decay-epoch", type=int, default=None, help="classifier stage: lr ×0.1 from it (0.9·epochs)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling, augmentation, episodes")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast in training on CUDA (evaluation and CPU: float32)")
    g = p.add_argument_group("episodes")
    g.add_argument("--way", type=int, default=5, help="classes per episode")
    g.add_argument("--shot", type=int, default=1, help="meta stage: support images per class in training episodes; "
                   "the best epoch is the one of the highest val accuracy at this shot (1 or 5; else 1)")
    g.add_argument("--query", type=int, default=15, help="query images per class")
    g.add_argument("--episodes-per-batch", type=int, default=4, help="meta stage: episodes per step per process")
    g.add_argument("--batches-per-epoch", type=int, default=200, help="meta stage: steps per epoch")
    g.add_argument("--val-episodes", type=int, default=800, help="validation episodes per shot after every epoch")
    g.add_argument("--test-episodes", type=int, default=8000, help="test episodes per shot (Meta-Baseline 10×200×4)")
    g.add_argument("--eval-split", default="test", choices=["val", "test"], help="split of the final evaluation")
    g.add_argument("--episode-seed", type=int, default=0, help="seed of the evaluation episodes (same for all runs)")
    g = p.add_argument_group("weak-to-strong supervision: loss = w_gt·CE(s, y) + w_kd·(teacher term)")
    g.add_argument("--loss", default="ce", choices=["ce", "kd", "rkd", "augconf", "adaptconf"], help="training loss")
    g.add_argument("--teacher", default=None, choices=sorted(MODELS), help="teacher backbone")
    g.add_argument("--teacher-ckpt", default=None, help="checkpoint of a classifier-stage teacher (meta stage: either)")
    g.add_argument("--gt-weight", type=float, default=1.0, help="w_gt, weight of CE with the labels (0: teacher only)")
    g.add_argument("--kd-weight", type=float, default=1.0, help="w_kd, weight of the teacher term")
    g.add_argument("--kd-T", type=float, default=10.0, help="KD temperature (also of AugConf and AdaptConf)")
    g.add_argument("--tau", type=float, default=None, help="AdaptConf β temperature (default 8 classifier, 0.25 meta)")
    g.add_argument("--alpha-max", type=float, default=0.5, help="AugConf final α")
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (none there: start afresh)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate this checkpoint's encoder, no training")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS", help="time STEPS training steps on random "
                   "images (random weights for a teacher without --teacher-ckpt, a meta student without --init)")
    args = p.parse_args(argv)
    check_numbers(p, args)
    defaults = {"classifier": dict(epochs=100, lr=0.1, tau=8.0), "meta": dict(epochs=20, lr=1e-3, tau=0.25)}
    for name, value in defaults[args.stage].items():   # Meta-Baseline's and the official code's, per stage
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.init and args.stage == "classifier":
        p.error("--init is for the meta stage; the classifier stage trains from scratch")
    if args.stage == "meta" and not (args.init or args.eval_only or args.benchmark):
        p.error("the meta stage starts from a classifier-stage encoder; pass --init CKPT")
    if args.loss != "ce" and not (args.teacher and (args.teacher_ckpt or args.benchmark)):
        p.error(f"--loss {args.loss} learns from a teacher; pass --teacher and --teacher-ckpt")
    if args.loss == "ce" and args.gt_weight == 0:
        p.error("--loss ce --gt-weight 0 leaves nothing to learn from; pass a --gt-weight above 0")
    if (args.eval_only or args.benchmark) and (args.resume or args.overwrite):
        p.error("--resume and --overwrite are for training runs; --eval-only and --benchmark only write their results")
    return args


if __name__ == "__main__":
    main(parse_args())
