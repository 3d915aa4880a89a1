"""Weak-to-strong generalization in few-shot learning: Meta-Baseline (Chen et al. 2021) on miniImageNet, with a weak
ResNet-12 / ResNet-18 teacher supervising a strong ResNet-36 student (Tables 5 and 6 of "Vision Superalignment").

Two stages, as in Meta-Baseline:
  classifier stage  the encoder plus a linear head over the 64 training classes, trained with CE on mini-batches
                    (random-resized-crop + flip); distillation from a classifier-stage teacher's logits on the same
                    batch (Table 5).
  meta stage        the encoder initialised from a classifier-stage checkpoint, trained on 5-way K-shot episodes
                    with 15 queries per class, 4 episodes a batch; logits = learnable scale (init 10) ×
                    cosine(query feature, class-mean prototype); distillation on the query logits from the teacher's
                    own prototype classifier, the teacher being a classifier-stage or meta-stage model (Table 6).
Every model is evaluated as Meta-Baseline does: seeded 5-way 1-shot and 5-shot episodes with 15 queries, the
prototype classifier on frozen features, mean accuracy with a 95% confidence interval 1.96·std/sqrt(episodes).

Commands (miniImageNet pickles or folders train/ val/ test/ in --data-dir; see the README for the full tables):
  # classifier stage: weak teacher, then the ResNet-36 student with AdaptConf (Table 5)
  torchrun --nproc_per_node=4 fewshot.py --stage classifier --model resnet12 --loss ce --batch-size 32 \
      --data-dir data/miniimagenet --out runs/cls_r12
  torchrun --nproc_per_node=4 fewshot.py --stage classifier --model resnet36 --loss adaptconf --batch-size 32 \
      --teacher resnet12 --teacher-ckpt runs/cls_r12/checkpoint.pt --data-dir data/miniimagenet --out runs/cls_r36_ac
  # meta stage: student encoder from its own classifier stage, teacher from either stage (Table 6)
  python fewshot.py --stage meta --model resnet36 --init runs/cls_r36/checkpoint.pt --loss adaptconf \
      --teacher resnet12 --teacher-ckpt runs/cls_r12/checkpoint.pt --data-dir data/miniimagenet --out runs/meta_r36_ac
  # evaluate any checkpoint of either stage on 8,000 test episodes
  python fewshot.py --model resnet36 --eval-only runs/meta_r36_ac/checkpoint.pt --data-dir data/miniimagenet --out x

Paper (3 trials each, 5-way accuracy %): Table 5, ResNet-36 student 60.91 (1-shot) / 79.01 (5-shot) from scratch,
61.50 / 79.52 with AdaptConf from a ResNet-12 teacher (59.65 / 77.80), 62.29 / 79.96 from a ResNet-18 teacher
(60.83 / 78.96). Table 6 (meta stage, 1-shot): 65.08 from scratch; AdaptConf 65.38 / 65.74 / 66.08 / 65.95 with a
ResNet-12 class-stage / ResNet-18 class-stage / ResNet-12 meta-stage / ResNet-18 meta-stage teacher.
Not measured here: no GPU was available while writing this script; the tests run tiny configurations on CPU.

Choices, where the official code (github ggjy/vision_weak_to_strong, few_shot_leaerning/) leaves room:
  - Loss = gt_weight·CE(s, y) + kd_weight·(distillation term), both weights 1, as in the official code.
  - AdaptConf β is scaled by min(epoch / (0.25·epochs), 1) with 0-indexed epochs (epoch 0 is pure KD, full β from
    epoch 0.25·epochs on); the official code uses 1-indexed epochs, i.e. one epoch ahead of this ramp. AugConf's α
    uses the same 25% ramp (common.augconf_alpha with warmup_frac=0.25), as the official few-shot code does.
  - The meta-stage teacher is the teacher's encoder with a prototype classifier of scale 10 (the official code
    loads only the teacher's encoder, so a meta-stage teacher's learned scale is not used either).
  - RKD acts on the pooled encoder features of every image in the step (batch, or all images of the episodes).
  - Evaluation extracts each image's feature once (eval mode, so features do not depend on the episode) and scores
    the episodes on those features; this equals running every episode through the network.
  - Images are resized to 80x80 (Meta-Baseline; the paper says 84, pass --image-size 84).
"""
import argparse
import json
import math
import os
import pickle
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import common

# ---- shared: DDP, seeding, logging, checkpoints ---------------------------------------------------------------
# Copied on purpose, identically, into every script of this repository (tests/test_copies.py keeps the copies equal),
# so that each script reads end to end on its own. Edit all copies together.

def setup_distributed():
    """Returns (rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world_size, device


def cleanup_distributed():
    # no barrier: a process that stops on an error must exit (torchrun then stops the others) instead of waiting in a
    # collective that the others, still training, will never join
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sums a tensor over all processes in place (no-op without DDP) and returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log_record(out_dir, record):
    """Prints one readable line and appends the same fields as one JSON object to <out_dir>/log.jsonl (rank 0 only)."""
    print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in record.items() if not isinstance(v, (list, dict))), flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def trim_log(out_dir, start_epoch):
    """On resume, drops log lines of epochs >= start_epoch (written after the checkpoint that is resumed)."""
    path = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("epoch", -1) < start_epoch]
        save_atomic("".join(kept), path)


def save_atomic(obj, path):
    """Writes to a temporary name, then renames: a killed run never leaves a half-written file. Strings are written
    as text, dicts of plain values as JSON when `path` ends in .json, everything else with torch.save."""
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(obj, str):
        with open(tmp, "w") as f:
            f.write(obj)
    elif path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state_dict(path):
    """Reads a checkpoint written by this repository, RepDistiller, mdistiller, the official code or torchvision:
    {"model": sd}, {"state_dict": sd}, {"net": sd} or a bare state_dict, with or without a "module." prefix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a trained model's checkpoint")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict", "net"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path} holds no state_dict (looked for 'model', 'state_dict', 'net' or a bare dict of "
                         "tensors); pass a checkpoint saved from a model")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_weights(model, state_dict, what):
    """Strict load that names the first missing, unexpected or mismatching tensor instead of listing hundreds."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state_dict:
            raise ValueError(f"{what}: tensor '{name}' is missing from the checkpoint; is it for a different model?")
        if state_dict[name].shape != tensor.shape:
            raise ValueError(f"{what}: tensor '{name}' has shape {tuple(state_dict[name].shape)} in the checkpoint but "
                             f"{tuple(tensor.shape)} in the model; check the model name and the number of classes")
    for name in state_dict:
        if name not in own:
            raise ValueError(f"{what}: the checkpoint has tensor '{name}' that the model lacks; is it for a different "
                             "model?")
    model.load_state_dict(state_dict, strict=True)


def broadcast_buffers(model):
    """Copies rank 0's buffers (BatchNorm running statistics) to every process; call before evaluating. DDP syncs them
    only at the start of each training forward, so after an epoch each process holds those of its own last batch,
    and without this the shards would be scored by slightly different models, none of them the one rank 0 saves."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def check_finite(loss, epoch, step):
    """Stops the run at the first NaN/inf loss, saying where (one host sync)."""
    if not torch.isfinite(loss).item():
        raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch}, step {step}; lower --lr, or check "
                                 "the data and the teacher checkpoint")
# ---- end shared --------------------------------------------------------------------------------------------------


# ---- models: the ResNets of Meta-Baseline and of the official few-shot code ----------------------------------------

class Block(nn.Module):
    """3 × (3x3 conv, BN, LeakyReLU 0.1), the last activation after the residual sum; a 1x1 conv + BN shortcut and a
    2x2 max-pool in the first block of a stage (Meta-Baseline's ResNet-12 block)."""

    def __init__(self, in_channels, channels, first_in_stage):
        super().__init__()
        self.relu = nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
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
    blocks in nn.Sequential (layer1.0.conv1.weight) as the official code's ResNet-18/36 do, so their checkpoints load.
    """

    def __init__(self, blocks_per_stage, width=64):
        super().__init__()
        in_channels = 3
        for k, (blocks, channels) in enumerate(zip(blocks_per_stage, (width, 2 * width, 4 * width, 8 * width))):
            stage = [Block(in_channels if i == 0 else channels, channels, first_in_stage=i == 0) for i in range(blocks)]
            self.add_module(f"layer{k + 1}", stage[0] if blocks_per_stage == (1, 1, 1, 1) else nn.Sequential(*stage))
            in_channels = channels
        self.out_dim = in_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.flatten(2).mean(dim=2)                                    # (B, 8w)


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
        return self.head(features), features


class MetaBaseline(nn.Module):
    """Meta stage: encoder + prototype classifier with a learnable scale (init 10).

    forward(images, way, shot, query): images (E·way·(shot+query), 3, H, W) ordered episode → class → image with
    the `shot` support images of each class first; returns (query logits (E·way·query, way), features)."""

    def __init__(self, encoder, scale=10.0, learnable=True):
        super().__init__()
        self.encoder = encoder
        if learnable:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    def forward(self, images, way, shot, query):
        features = self.encoder(images)                                    # (E·way·(shot+query), D)
        per_episode = features.view(-1, way, shot + query, features.shape[-1])
        queries = per_episode[:, :, shot:].reshape(len(per_episode), way * query, -1)
        logits = prototype_logits(per_episode[:, :, :shot], queries, self.scale)
        return logits.reshape(-1, way), features


def episode_labels(episodes, way, query, device):
    """(episodes·way·query,) query labels in MetaBaseline's order: class 0's queries, then class 1's, ..."""
    return torch.arange(way, device=device).repeat_interleave(query).repeat(episodes)


def read_weights(path):
    """A checkpoint's state_dict in this script's names: ours, or Meta-Baseline's / the official code's
    {"model_sd": ...} (classifier.linear.* → head.*, temp → scale)."""
    raw = None
    if os.path.isfile(path):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise ValueError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}); pass a checkpoint written "
                             "by fewshot.py") from error
    if isinstance(raw, dict) and isinstance(raw.get("model_sd"), dict):
        renames = {"classifier.linear.": "head.", "temp": "scale"}
        state = {}
        for name, tensor in raw["model_sd"].items():
            for old, new in renames.items():
                if name.startswith(old):
                    name = new + name[len(old):]
            state[name] = tensor
        return state
    return load_state_dict(path)


def encoder_weights(state, path):
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError(f"{path} holds no 'encoder.*' tensors; pass a checkpoint written by fewshot.py (either stage)")
    return encoder


# ---- data: miniImageNet held in memory as uint8, augmentation as batched tensor ops ---------------------------------

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
PICKLE_NAMES = {"train": "train_phase_train", "val": "val", "test": "test"}


def load_split(data_dir, split, image_size):
    """Returns (images uint8 (N, 3, S, S), labels long (N,) in 0..C-1) of one split, from
    miniImageNet_category_split_<name>.pickle or from the folder <data_dir>/<split>/<class>/<image>."""
    pickle_path = os.path.join(data_dir, f"miniImageNet_category_split_{PICKLE_NAMES[split]}.pickle")
    folder = os.path.join(data_dir, split)
    if os.path.isfile(pickle_path):
        with open(pickle_path, "rb") as f:
            pack = pickle.load(f, encoding="latin1")
        if not isinstance(pack, dict) or "data" not in pack or "labels" not in pack:
            raise ValueError(f"{pickle_path} is not a miniImageNet pickle (a dict with 'data' and 'labels'); "
                             "re-download it")
        images = torch.from_numpy(np.ascontiguousarray(pack["data"])).permute(0, 3, 1, 2)   # (N, 3, 84, 84)
        labels = np.asarray(pack["labels"])
    elif os.path.isdir(folder):
        classes = sorted(c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c)))
        arrays, labels = [], []
        for k, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(folder, name))):
                with Image.open(os.path.join(folder, name, file)) as img:
                    arrays.append(np.asarray(resize_center_crop(img.convert("RGB"), image_size)))
                labels.append(k)
        if not arrays:
            raise FileNotFoundError(f"{folder} holds no class folders with images; expected {folder}/<class>/<image>")
        images, labels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), np.asarray(labels)
    else:
        raise FileNotFoundError(f"the {split} split is missing: neither {pickle_path} nor the folder {folder} exists; "
                                "point --data-dir at the miniImageNet pickles or at a folder with train/ val/ test/")
    if images.shape[-1] != image_size or images.shape[-2] != image_size:   # 84 → 80 as Meta-Baseline's Resize(80)
        resized = [F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                                 align_corners=False).round().clamp(0, 255).to(torch.uint8)
                   for chunk in images.split(1024)]
        images = torch.cat(resized)
    _, labels = np.unique(labels, return_inverse=True)                     # e.g. 64..79 → 0..15
    return images.contiguous(), torch.from_numpy(labels.astype(np.int64))


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
        raise ValueError(f"the {split} split has {len(per_class)} classes, fewer than the {way} an episode needs; "
                         "lower --way or use a larger split")
    smallest = min(len(c) for c in per_class)
    if smallest < images_per_class:
        raise ValueError(f"a class of the {split} split has only {smallest} images, but an episode needs shot + query "
                         f"= {images_per_class} per class; lower --query or use a larger split")


def sample_episode(rng, per_class, way, shot, query):
    """(way, shot + query) image indices: `way` distinct classes, shot + query distinct images of each; the first
    `shot` columns are the support set, the rest the queries."""
    classes = rng.choice(len(per_class), way, replace=False)
    return np.stack([rng.choice(per_class[c], shot + query, replace=False) for c in classes])


def normalize(images_uint8):
    x = images_uint8.float().div_(255)
    return (x - MEAN.to(x.device)) / STD.to(x.device)


def random_resized_crop_flip(x, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Batched RandomResizedCrop (to the input size) + horizontal flip on (B, 3, S, S) float images: one random box
    per image, resampled bilinearly with affine_grid/grid_sample. Boxes that would leave the image are clipped."""
    b = len(x)
    u = torch.rand(b, 5, generator=generator)                              # drawn on the CPU: same on any device
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)                     # box width / image width
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)      # box centre in [-1, 1] coordinates
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def to_device(images, device):
    x = images.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def classifier_batches(train, args, epoch, rank, world_size, device):
    """Classifier stage: yields (augmented images, labels, {}) of this rank's shard of a per-epoch permutation."""
    images, labels = train
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    order = order[: len(order) // world_size * world_size][rank::world_size]   # equal step counts on all ranks
    augment = torch.Generator().manual_seed((args.seed + rank) * 1000 + epoch)   # seed + rank, per epoch
    for start in range(0, len(order), args.batch_size):
        idx = order[start:start + args.batch_size]
        x = random_resized_crop_flip(normalize(images[idx.to(images.device)]), augment)
        yield to_device(x, device), labels[idx].to(device), {}


def episode_batches(train, per_class, args, epoch, rank, device):
    """Meta stage: yields --batches-per-epoch batches of --episodes-per-batch training episodes (no augmentation)."""
    images, _ = train
    rng = np.random.default_rng([args.seed, rank, epoch])                  # own episodes per rank, resumable
    shape = dict(way=args.way, shot=args.shot, query=args.query)
    for _ in range(args.batches_per_epoch):
        idx = np.concatenate([sample_episode(rng, per_class, args.way, args.shot, args.query).reshape(-1)
                              for _ in range(args.episodes_per_batch)])
        x = normalize(images[torch.from_numpy(idx).to(images.device)])
        yield (to_device(x, device), episode_labels(args.episodes_per_batch, args.way, args.query, device), shape)


# ---- loss: Eq. 2 of the paper and its baselines, from common.py ------------------------------------------------------

def distill_loss(args, epoch, s_logits, t_logits, s_features, t_features):
    """The teacher term, scalar. Classifier stage: logits over the training classes; meta stage: query logits."""
    if args.loss == "kd":
        return common.kd_loss(s_logits, t_logits, T=args.kd_T)
    elif args.loss == "rkd":
        return common.rkd_loss(s_features, t_features)
    elif args.loss == "augconf":   # Eq. 1, α ramped over the first 25% of epochs as in the official few-shot code
        alpha = common.augconf_alpha(epoch, args.epochs, args.alpha_max, warmup_frac=0.25)
        return common.augconf_loss(s_logits, t_logits, alpha, T=args.kd_T)
    elif args.loss == "adaptconf":   # Eq. 2, β scaled up linearly over the first 25% of epochs (0-indexed)
        return common.adaptconf_loss(s_logits, t_logits, tau=args.tau, T=args.kd_T, beta_scale=beta_scale(args, epoch))
    raise ValueError(f"unknown --loss {args.loss!r}; choose ce, kd, rkd, augconf or adaptconf")


def beta_scale(args, epoch):
    return min(epoch / (0.25 * args.epochs), 1.0)


# ---- training and evaluation -----------------------------------------------------------------------------------------

def lr_at(args, epoch):
    """Classifier stage: lr, ×0.1 from --lr-decay-epoch on (90 of 100); meta stage: fixed."""
    return args.lr * (0.1 if args.lr_decay_epoch is not None and epoch >= args.lr_decay_epoch else 1.0)


def train_step(model, teacher, optimizer, images, labels, shape, args, epoch, use_amp):
    """One optimisation step; returns detached (total, gt term, teacher term, correct, β or None)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        logits, features = model(images, **shape)
        loss_gt = F.cross_entropy(logits.float(), labels)
        loss_distill, beta = torch.zeros((), device=labels.device), None
        if teacher is not None:
            with torch.no_grad():
                t_logits, t_features = teacher(images, **shape)
            loss_distill = distill_loss(args, epoch, logits, t_logits, features, t_features)
            if args.loss == "adaptconf":   # unscaled β, for the log (the loss uses beta_scale·β)
                beta = common.adaptconf_beta(logits, t_logits, tau=args.tau)
    loss = args.gt_weight * loss_gt + args.kd_weight * loss_distill
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = common.topk_correct(logits.float(), labels, topk=(1,))[0]
    return loss.detach(), loss_gt.detach(), loss_distill.detach(), correct, beta


def train_one_epoch(model, teacher, optimizer, batches, args, epoch, use_amp, device):
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(args, epoch)
    sums = torch.zeros(7, device=device)   # loss, gt, distill (summed over steps), steps, correct, labels, images
    beta_sums = torch.zeros(13, device=device)   # Σβ, #β == 0.5, count, 10-bin histogram over [0, 0.5]
    start = time.time()
    for step, (images, labels, shape) in enumerate(batches):
        loss, loss_gt, loss_distill, correct, beta = train_step(model, teacher, optimizer, images, labels, shape,
                                                                args, epoch, use_amp)
        check_finite(loss, epoch, step)
        sums += torch.stack([loss, loss_gt, loss_distill, torch.ones_like(loss), correct,
                             torch.tensor(float(len(labels)), device=device),
                             torch.tensor(float(len(images)), device=device)])
        if beta is not None:
            beta_sums += torch.cat([torch.stack([beta.sum(), (beta == 0.5).sum().float(),
                                                 torch.tensor(float(len(beta)), device=device)]),
                                    torch.histc(beta, bins=10, min=0.0, max=0.5)])
    all_reduce_sum(sums)
    all_reduce_sum(beta_sums)
    seconds = time.time() - start
    record = {"lr": lr_at(args, epoch), "loss": (sums[0] / sums[3]).item(), "loss_gt": (sums[1] / sums[3]).item(),
              "loss_distill": (sums[2] / sums[3]).item(), "train_acc": (100 * sums[4] / sums[5]).item(),
              "images_per_s": sums[6].item() / max(seconds, 1e-9), "train_seconds": seconds}
    if args.loss == "adaptconf":
        record.update(beta_scale=beta_scale(args, epoch), beta_mean=(beta_sums[0] / beta_sums[2]).item(),
                      beta_frac_half=(beta_sums[1] / beta_sums[2]).item(),
                      beta_hist=(beta_sums[3:] / beta_sums[2]).tolist())
    return record


@torch.no_grad()
def extract_features(encoder, images, args, rank, world_size, device, use_amp):
    """(N, D) float32 features of every image, each computed by one rank and summed into place on all ranks."""
    encoder.eval()
    mine = torch.arange(rank, len(images), world_size)
    features = None
    for idx in mine.split(args.eval_batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = encoder(to_device(normalize(images[idx.to(images.device)]), device)).float()
        if features is None:
            features = torch.zeros(len(images), out.shape[1], device=device)
        features[idx.to(device)] = out
    if features is None:   # more ranks than images: this rank has none, but still joins the sum
        dim = encoder(to_device(normalize(images[:1]), device)).shape[1]
        features = torch.zeros(len(images), dim, device=device)
    return all_reduce_sum(features)


def episode_accuracies(features, per_class, way, shot, query, episodes, seed, rank, world_size):
    """(episodes,) accuracy of the prototype classifier on each seeded episode. Episode i is drawn from its own
    generator (seed, i), so the episodes do not depend on the number of ranks; rank r scores episodes r, r + W, ...
    and one all-reduce puts every accuracy in place exactly once."""
    accuracies = torch.zeros(episodes, device=features.device, dtype=torch.float64)
    mine = list(range(rank, episodes, world_size))
    labels = torch.arange(way, device=features.device).repeat_interleave(query)
    for chunk in range(0, len(mine), 256):
        ids = mine[chunk:chunk + 256]
        idx = np.stack([sample_episode(np.random.default_rng([seed, i]), per_class, way, shot, query) for i in ids])
        f = features[torch.from_numpy(idx).to(features.device)]            # (E, way, shot + query, D)
        logits = prototype_logits(f[:, :, :shot], f[:, :, shot:].reshape(len(ids), way * query, -1), 1.0)
        accuracies[ids] = (logits.argmax(dim=2) == labels).double().mean(dim=1)
    return all_reduce_sum(accuracies)


def mean_ci(accuracies):
    """(mean %, 95% confidence interval %) = 100·mean, 100·1.96·std/sqrt(n) (sample std, ddof 1)."""
    a = np.asarray(accuracies, dtype=np.float64)
    std = a.std(ddof=1) if len(a) > 1 else 0.0
    return 100 * a.mean(), 100 * 1.96 * std / math.sqrt(len(a))


def evaluate(encoder, split, per_class, args, episodes, rank, world_size, device, use_amp):
    """{"<k>shot": mean %, "<k>shot_ci": 95% CI %} for k in (1, 5) on `episodes` seeded episodes of a split."""
    broadcast_buffers(encoder)     # every process extracts features with rank 0's BatchNorm statistics
    features = extract_features(encoder, split[0], args, rank, world_size, device, use_amp)
    result = {}
    for shot in (1, 5):
        accs = episode_accuracies(features, per_class, args.way, shot, args.query, episodes, args.episode_seed, rank,
                                  world_size)
        result[f"{shot}shot"], result[f"{shot}shot_ci"] = mean_ci(accs.cpu().numpy())
    return result


# ---- main ------------------------------------------------------------------------------------------------------------

STAGE_DEFAULTS = {   # Meta-Baseline / official code, per stage
    "classifier": dict(epochs=100, lr=0.1, tau=8.0),
    "meta": dict(epochs=20, lr=1e-3, tau=0.25),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/miniimagenet", help="miniImageNet pickles, or train/ val/ test/ folders")
    g.add_argument("--image-size", type=int, default=80, help="images are resized to this square (84 in the paper)")
    g.add_argument("--out", default=None, help="output directory (log.jsonl, results.json, checkpoint.pt)")
    g = p.add_argument_group("model and stage")
    g.add_argument("--stage", default="classifier", choices=["classifier", "meta"], help="Meta-Baseline stage")
    g.add_argument("--model", default="resnet36", choices=sorted(MODELS), help="student backbone")
    g.add_argument("--width", type=int, default=64, help="first-stage channels of every backbone (64; less for tests)")
    g.add_argument("--init", default=None, help="meta stage: classifier-stage checkpoint that initialises the encoder")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 100 classifier stage, 20 meta stage)")
    g.add_argument("--batch-size", type=int, default=128, help="classifier stage: images per step per process")
    g.add_argument("--lr", type=float, default=None, help="SGD lr (default 0.1 classifier stage, 1e-3 meta stage)")
    g.add_argument("--lr-decay-epoch", type=int, default=None, help="classifier stage: lr ×0.1 from here (0.9·epochs)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling, augmentation, episodes")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA only)")
    g = p.add_argument_group("episodes")
    g.add_argument("--way", type=int, default=5, help="classes per episode")
    g.add_argument("--shot", type=int, default=1, help="meta stage: support images per class in training episodes")
    g.add_argument("--query", type=int, default=15, help="query images per class")
    g.add_argument("--episodes-per-batch", type=int, default=4, help="meta stage: episodes per step per process")
    g.add_argument("--batches-per-epoch", type=int, default=200, help="meta stage: steps per epoch")
    g.add_argument("--val-episodes", type=int, default=800, help="validation episodes per shot after every epoch")
    g.add_argument("--test-episodes", type=int, default=8000, help="test episodes per shot (Meta-Baseline 10×200×4)")
    g.add_argument("--eval-split", default="test", choices=["val", "test"], help="split of the final evaluation")
    g.add_argument("--episode-seed", type=int, default=0, help="seed of the evaluation episodes (same for all runs)")
    g.add_argument("--eval-batch-size", type=int, default=256, help="images per forward pass when evaluating")
    g = p.add_argument_group("weak-to-strong supervision")
    g.add_argument("--loss", default="ce", choices=["ce", "kd", "rkd", "augconf", "adaptconf"], help="training loss")
    g.add_argument("--teacher", default=None, choices=sorted(MODELS), help="teacher backbone")
    g.add_argument("--teacher-ckpt", default=None, help="teacher checkpoint (classifier stage for the classifier "
                                                        "stage; either stage for the meta stage)")
    g.add_argument("--gt-weight", type=float, default=1.0, help="weight of CE with the labels (0 = teacher only)")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the teacher term")
    g.add_argument("--kd-T", type=float, default=10.0, help="KD temperature")
    g.add_argument("--tau", type=float, default=None, help="AdaptConf β temperature (default 8 classifier, 0.25 meta)")
    g.add_argument("--alpha-max", type=float, default=0.5, help="AugConf final α")
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate this checkpoint's encoder, no training")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS", help="time STEPS steps on synthetic images")
    args = p.parse_args(argv)
    for name, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr_decay_epoch is None and args.stage == "classifier":
        args.lr_decay_epoch = int(0.9 * args.epochs)
    return args


def build_teacher(args, num_classes, device):
    """The frozen teacher: classifier stage, encoder + linear head (its logits); meta stage, encoder + prototype
    classifier of scale 10 (as the official code, which loads only the teacher's encoder)."""
    if args.teacher is None or args.teacher_ckpt is None:
        raise SystemExit(f"--loss {args.loss} learns from a teacher; pass --teacher and --teacher-ckpt")
    state = read_weights(args.teacher_ckpt)
    encoder = MODELS[args.teacher](args.width)
    if args.stage == "classifier":
        if "head.weight" not in state:
            raise ValueError(f"{args.teacher_ckpt} has no linear head; the classifier stage needs a classifier-stage "
                             "teacher")
        if state["head.weight"].shape[0] != num_classes:
            raise ValueError(f"the teacher {args.teacher_ckpt} predicts {state['head.weight'].shape[0]} classes but "
                             f"the training split has {num_classes}; use a teacher trained on the same split")
        teacher = Classifier(encoder, num_classes)
        load_weights(teacher, {k: v for k, v in state.items() if k.startswith(("encoder.", "head."))},
                     f"teacher {args.teacher}")
    else:
        teacher = MetaBaseline(encoder, learnable=False)
        load_weights(teacher.encoder, encoder_weights(state, args.teacher_ckpt), f"teacher {args.teacher}")
    teacher.to(device).eval().requires_grad_(False)
    return teacher.to(memory_format=torch.channels_last) if device.type == "cuda" else teacher


def build_student(args, num_classes, device):
    seed_everything(args.seed)
    encoder = MODELS[args.model](args.width)
    if args.stage == "classifier":
        if args.init is not None:
            raise SystemExit("--init is for the meta stage; the classifier stage trains from scratch")
        model = Classifier(encoder, num_classes)
    else:
        if args.init is None:
            raise SystemExit("the meta stage starts from a classifier-stage encoder; pass --init CKPT")
        load_weights(encoder, encoder_weights(read_weights(args.init), args.init), f"--init {args.model}")
        model = MetaBaseline(encoder)
    model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def benchmark(args, device, use_amp):
    """Times args.benchmark training steps of this stage on random images (after 3 warm-up steps)."""
    s = args.image_size
    if args.stage == "classifier":
        num_classes, shape = 64, {}
        images = normalize(torch.randint(0, 256, (args.batch_size, 3, s, s), dtype=torch.uint8))
        labels = torch.randint(0, num_classes, (args.batch_size,), device=device)
    else:
        num_classes, shape = 64, dict(way=args.way, shot=args.shot, query=args.query)
        n = args.episodes_per_batch * args.way * (args.shot + args.query)
        images = normalize(torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8))
        labels = episode_labels(args.episodes_per_batch, args.way, args.query, device)
    images = to_device(images, device)
    seed_everything(args.seed)
    encoder = MODELS[args.model](args.width)
    model = (Classifier(encoder, num_classes) if args.stage == "classifier" else MetaBaseline(encoder)).to(device)
    teacher = None
    if args.loss != "ce":
        if args.teacher is None:
            raise SystemExit(f"--benchmark with --loss {args.loss} needs --teacher (random weights are fine)")
        t_encoder = MODELS[args.teacher](args.width)
        teacher = (Classifier(t_encoder, num_classes) if args.stage == "classifier"
                   else MetaBaseline(t_encoder, learnable=False)).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    for step in range(3 + args.benchmark):
        if step == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.time()
        train_step(model, teacher, optimizer, images, labels, shape, args, 0, use_amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1000 * (time.time() - start) / args.benchmark
    print(f"benchmark {args.stage} stage {args.model} loss {args.loss}: {ms:.1f} ms/step, "
          f"{len(images) * 1000 / ms:.0f} images/s ({len(images)} images/step, device {device}, amp {use_amp})")
    return {"ms_per_step": ms, "images_per_s": len(images) * 1000 / ms}


def main(args):
    rank, world_size, device = setup_distributed()
    use_amp = args.amp and device.type == "cuda"
    try:
        if args.out and rank == 0:
            os.makedirs(args.out, exist_ok=True)
        if args.benchmark:
            return benchmark(args, device, use_amp)
        start_time = time.time()
        if args.eval_only:
            return evaluate_checkpoint(args, rank, world_size, device, use_amp, start_time)
        return train(args, rank, world_size, device, use_amp, start_time)
    finally:
        cleanup_distributed()


def evaluate_checkpoint(args, rank, world_size, device, use_amp, start_time):
    encoder = MODELS[args.model](args.width)
    load_weights(encoder, encoder_weights(read_weights(args.eval_only), args.eval_only), f"--eval-only {args.model}")
    encoder.to(device)
    split = load_split(args.data_dir, args.eval_split, args.image_size)
    per_class = images_by_class(split[1])
    check_episodes(args.eval_split, per_class, args.way, 5 + args.query)
    result = evaluate(encoder, split, per_class, args, args.test_episodes, rank, world_size, device, use_amp)
    results = {args.eval_split: result, "episodes": args.test_episodes, "checkpoint": args.eval_only,
               "args": vars(args), "seconds": time.time() - start_time}
    if rank == 0:
        print(json.dumps(result))
        if args.out:
            save_atomic(results, os.path.join(args.out, "results.json"))
    return results


def train(args, rank, world_size, device, use_amp, start_time):
    train_split = load_split(args.data_dir, "train", args.image_size)
    val_split = load_split(args.data_dir, "val", args.image_size)
    test_split = val_split if args.eval_split == "val" else load_split(args.data_dir, "test", args.image_size)
    train_per_class, val_per_class = images_by_class(train_split[1]), images_by_class(val_split[1])
    test_per_class = images_by_class(test_split[1])
    if args.stage == "meta":
        check_episodes("train", train_per_class, args.way, args.shot + args.query)
    check_episodes("val", val_per_class, args.way, 5 + args.query)
    check_episodes(args.eval_split, test_per_class, args.way, 5 + args.query)
    if device.type == "cuda":   # the whole split lives on the GPU as uint8 (miniImageNet train: 0.74 GB at 80x80)
        train_split = (train_split[0].to(device), train_split[1])
    num_classes = len(train_per_class)

    model = build_student(args, num_classes, device)
    raw_model = model
    teacher = build_teacher(args, num_classes, device) if args.loss != "ce" else None
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)

    start_epoch, best, last_top1 = 0, {"top1": -1.0, "epoch": -1}, None
    if args.resume:
        path = os.path.join(args.out or "", "checkpoint.pt")
        if not args.out or not os.path.isfile(path):
            raise FileNotFoundError(f"--resume needs {path}; pass the --out of the run to continue")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        load_weights(raw_model, ckpt["model"], "--resume")
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best, last_top1 = ckpt["epoch"], ckpt["best"], ckpt["last_top1"]
        if rank == 0:
            trim_log(args.out, start_epoch)

    if rank == 0:
        per_step = (f"{args.batch_size * world_size} images" if args.stage == "classifier" else
                    f"{args.episodes_per_batch * world_size} episodes of {args.way}-way {args.shot}-shot "
                    f"{args.query}-query")
        print(f"{args.stage} stage: {args.model} ({sum(p.numel() for p in raw_model.parameters()):,} parameters), "
              f"loss {args.loss}, teacher {args.teacher if teacher is not None else None}, {world_size} process(es), "
              f"global batch {per_step}, lr {args.lr} (x0.1 from epoch {args.lr_decay_epoch}), {num_classes} train "
              f"classes, device {device}, bf16 {use_amp}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        if args.stage == "classifier":
            batches = classifier_batches(train_split, args, epoch, rank, world_size, device)
        else:
            batches = episode_batches(train_split, train_per_class, args, epoch, rank, device)
        record = {"epoch": epoch}
        record.update(train_one_epoch(model, teacher, optimizer, batches, args, epoch, use_amp, device))
        val = evaluate(raw_model.encoder, val_split, val_per_class, args, args.val_episodes, rank, world_size,
                       device, use_amp)
        # top1: the model-selection metric, val accuracy at the training shot (1-shot for the classifier stage)
        last_top1 = val[f"{args.shot if args.shot in (1, 5) else 1}shot"]
        record.update({f"val_{k}": v for k, v in val.items()}, top1=last_top1, seconds=time.time() - epoch_start)
        if args.stage == "meta":
            record["scale"] = raw_model.scale.item()
        if last_top1 > best["top1"]:
            best = {"top1": last_top1, "epoch": epoch}
        if rank == 0:
            log_record(args.out, record)
            if args.out:
                save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                             "epoch": epoch + 1, "best": best, "last_top1": last_top1, "stage": args.stage,
                             "args": vars(args)},
                            os.path.join(args.out, "checkpoint.pt"))

    test = evaluate(raw_model.encoder, test_split, test_per_class, args, args.test_episodes, rank, world_size,
                    device, use_amp)
    results = {args.eval_split: test, "episodes": args.test_episodes, "final_val_top1": last_top1,
               "best_val_top1": best["top1"], "best_epoch": best["epoch"], "args": vars(args),
               "seconds": time.time() - start_time}
    if rank == 0:
        print(f"{args.eval_split} ({args.test_episodes} episodes): 1-shot {test['1shot']:.2f} ± {test['1shot_ci']:.2f}"
              f"  5-shot {test['5shot']:.2f} ± {test['5shot_ci']:.2f}", flush=True)
        if args.out:
            save_atomic(results, os.path.join(args.out, "results.json"))
    return results


if __name__ == "__main__":
    main(parse_args())
