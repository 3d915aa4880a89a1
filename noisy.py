"""Weak-to-strong generalization under label noise (paper Table 7): Sel-CL+ on CIFAR-10/100 with a weak teacher.

A PreAct ResNet-18 teacher supervises a PreAct ResNet-34 student trained on CIFAR-10/100 whose training labels carry
symmetric (20%) or asymmetric (40%) synthetic noise, inside the Sel-CL+ framework (Li et al., CVPR 2022,
"Selective-supervised contrastive learning with noisy labels"). Each run has two stages:

  stage one (Sel-CL, --epochs 250, lr 0.1 ×0.1 at 125 and 200, 5 lr warm-up epochs): after one warm-up epoch of
    instance contrast, confident examples are re-selected after every epoch (noisy label = the vote of the k = 250
    nearest neighbours in the embedding space) and confident pairs formed (same noisy label; both confident, or
    similar enough); training uses a supervised contrastive loss over the confident pairs (temperature 0.1, mixup
    inputs as in Sel-CL/MOIT) plus a mixup (α 1) cross-entropy on confident examples.
  stage two (the "+", --finetune-epochs 70 at a constant 1e-3): a new classifier `linear2`, fine-tuning on the
    confident examples with mixup cross-entropy (bootstrapped targets from epoch 30). Here, and only here, the
    teacher acts on the same mixed images (as in the official code), with KD weight 1 and KD temperature T 20
    (CIFAR-10 symmetric), 10 (CIFAR-10 asymmetric), 1 (CIFAR-100) by default:
      ce        no teacher (plain Sel-CL+; also how the teacher itself is trained)
      kd        + KL_T(s, t)                      rkd       + RKD(pooled features of student and teacher)
      augconf   + (1−α)·KL_T(s, t) + α·CE(s, argmax s)   (Eq. 1, α ramps to 0.5 over the first 30%)
      adaptconf + mean[(1−β)·KL_T(s, t) + β·CE(s, argmax s)]   (Eq. 2, τ 0.5; β ramped over the first 25% of the
                stage, as the official noisy-label code does)

Noise (REFERENCE.md §2, `make_noisy_labels`) is seeded (--noise-seed) and saved as <out>/noisy_labels.npy, with the
realised rate and transition matrix in <out>/noise.json; pass the teacher's file to the student (--noisy-labels) so
both see the same labels. <out>/stage1_model.pt holds stage one's weights and selection: the official code distils
from the teacher's stage-one model (pass it as --teacher-ckpt), and --stage1-ckpt lets several student losses share
one student stage one.

Commands (CIFAR-100, symmetric 20%; see the README for all of Table 7):
  python noisy.py --dataset cifar100 --data-dir ../shared/data --noise-type symmetric --noise-rate 0.2 \
      --model preact_resnet18 --loss ce --out runs/c100_sym_t
  python noisy.py --dataset cifar100 --data-dir ../shared/data --noise-type symmetric --noise-rate 0.2 \
      --noisy-labels runs/c100_sym_t/noisy_labels.npy --model preact_resnet34 --loss adaptconf \
      --teacher preact_resnet18 --teacher-ckpt runs/c100_sym_t/stage1_model.pt --out runs/c100_sym_adaptconf
  torchrun --nproc_per_node=8 noisy.py ... (same flags; --batch-size is per process, so use --batch-size 16 to keep
      the recipe's global batch of 128)

Reproduces Table 7 of "Vision Superalignment" (arXiv 2402.03749): e.g. CIFAR-100 symmetric 20%, teacher PR18 76.16,
student PR34 78.20 from scratch, 78.64 with AdaptConf (top-1, mean of 3 trials in the paper). Not measured here: no
full run has been made with this script (see the README for what was checked).

Simplified against the official Sel-CL code (ShikunLi/Sel-CL, reused by ggjy/vision_weak_to_strong), on purpose:
  - The unsupervised contrastive term (MoCo: an EMA key encoder and a queue of 10,000 keys, used during warm-up and
    for samples without a confident partner in the batch) is replaced by in-batch instance contrast: every sample
    always has its other augmented view as a positive in the same loss (SupCon/MOIT form), so a sample without a
    confident partner gets the in-batch instance-contrast loss at the same temperature.
  - No memory queue for the supervised contrastive term (sup_queue_use): positives and negatives are in-batch only.
  - No prediction-similarity loss (lambda_s = 0.01 in the official code).
  - The contrastive batch and the batch of confident examples for the classification loss go through the network
    in one forward pass (BN statistics over both; one DDP forward per step); the official code runs four passes.
  - Augmentation is pad-4 random crop + flip on the GPU in both stages; official stage one uses RandomResizedCrop,
    colour jitter and grayscale ("complex" DA).
  - In the mixup term of the contrastive loss, positives are a set (the mixed-in image's own columns count once;
    the official code counts them twice); a sample is not its own neighbour in the kNN vote (the official code only
    excludes itself for the first 100 samples); the pair-similarity quantile is read from a 20,001-bin histogram
    (accurate to 1e-4) instead of np.quantile over all pairs, and pair masks are computed per batch from the
    stored embeddings instead of an N×N matrix. The last incomplete batch of an epoch is dropped.
The selection itself (two kNN votes, per-class median/quantile budget over agreeing samples, lowest discrepancy
first, pair threshold from the β quantile; per-setting α/β of the official run scripts) follows the official code.
"""
import argparse
import json
import os
import pickle
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from common import adaptconf_beta, adaptconf_loss, augconf_alpha, augconf_loss, kd_loss, rkd_loss, topk_correct

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


# ---------------------------------------------------------------------------------------------------------------
# Models: PreAct ResNet as Sel-CL builds it (key names match the official checkpoints)
# ---------------------------------------------------------------------------------------------------------------

class PreActBlock(nn.Module):
    """Pre-activation basic block (He 2016): BN-ReLU-conv-BN-ReLU-conv; a projection shortcut sees the activated
    input."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """Stem 3x3 conv + BN + ReLU, four stages of pre-activation blocks, no BN after the last block, global average
    pool; `linear2` classifies, `head` projects to the L2-normalised contrastive embedding.
    forward(x) → (logits (B, C), embedding (B, embed_dim) with unit norm, pooled features (B, 8·width))."""

    def __init__(self, num_blocks, num_classes, width=64, embed_dim=128):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for i, (blocks, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            planes = width * 2 ** i
            layer = []
            for s in [stride] + [1] * (blocks - 1):
                layer.append(PreActBlock(in_planes, planes, s))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.linear2 = nn.Linear(in_planes, num_classes)
        self.head = nn.Linear(in_planes, embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)                  # (B, 512)
        return self.linear2(pooled), F.normalize(self.head(pooled), dim=1), pooled


MODELS = {
    "preact_resnet18": lambda num_classes: PreActResNet([2, 2, 2, 2], num_classes),     # 11,236,938 params at 10 cl.
    "preact_resnet34": lambda num_classes: PreActResNet([3, 4, 6, 3], num_classes),     # 21,345,098 params at 10 cl.
    # 1/8 width, for smoke tests and trying the script on a CPU
    "preact_resnet18_w8": lambda num_classes: PreActResNet([2, 2, 2, 2], num_classes, width=8, embed_dim=32),
}


def build_model(name, num_classes):
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes)


# ---------------------------------------------------------------------------------------------------------------
# Data: CIFAR pickles held on the device as uint8, augmented there in batches
# ---------------------------------------------------------------------------------------------------------------

# normalisation of the official Sel-CL code
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
            "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
            "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}
CIFAR10_ASYM = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}   # truck→automobile, bird→airplane, deer→horse, cat↔dog


def _unpickle(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; --data-dir must hold the python version of CIFAR "
                                "(cifar-10-batches-py/ or cifar-100-python/) as torchvision downloads it")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        d["data"] = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    except Exception as e:
        raise ValueError(f"{path} is not a CIFAR python pickle ({type(e).__name__}: {e}); re-download the data set")
    return d


def load_cifar(data_dir, dataset):
    """dict with train_x/test_x (N, 3, 32, 32) uint8, train_y/test_y (N,) int64, coarse (N,) or None, num_classes."""
    if dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"unknown dataset '{dataset}'; choose cifar10, cifar100 or synthetic")
    ten = dataset == "cifar10"
    folder = os.path.join(data_dir, "cifar-10-batches-py" if ten else "cifar-100-python")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} not found; pass --data-dir with the folder that holds "
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


def synthetic_data(num_classes, n_train, n_test, size=32, seed=0):
    """A small learnable stand-in for CIFAR: each class has its own colour and stripe frequency, plus pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]

    def make(n):
        labels = rng.permutation(np.arange(n) % num_classes)
        colour = np.stack([(97 * labels) % 256, (53 * labels + 80) % 256, (181 * labels + 40) % 256], 1)
        freq = 0.3 + 0.2 * labels[:, None, None]
        stripes = np.sin(np.where(labels[:, None, None] % 2 == 1, xx, yy) * freq) * 50      # (n, size, size)
        img = colour[:, :, None, None] + stripes[:, None] + rng.normal(0, 30, size=(n, 3, size, size))
        return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "coarse": None,
            "num_classes": num_classes}


def asymmetric_class_map(dataset, num_classes, fine_labels=None, coarse_labels=None):
    """(C,) array: the class every flipped label of class c becomes (REFERENCE.md §2)."""
    class_map = np.arange(num_classes)
    if dataset == "cifar10":
        for src, dst in CIFAR10_ASYM.items():
            class_map[src] = dst
    elif dataset == "cifar100":
        # within each superclass, the 5 fine classes in sorted order map j → j+1 circularly
        for superclass in np.unique(coarse_labels):
            fine = np.unique(fine_labels[coarse_labels == superclass])                 # sorted
            class_map[fine] = np.roll(fine, -1)
    else:
        class_map = (class_map + 1) % num_classes       # synthetic data: every class to the next one
    return class_map


def make_noisy_labels(true_labels, num_classes, noise_type, rate, seed, class_map=None):
    """Seeded noisy copy of `true_labels` (REFERENCE.md §2). symmetric: exactly round(rate·N) samples, chosen
    without replacement, get a label drawn uniformly from all C classes (their true class included); asymmetric:
    each sample independently flips to class_map[y] with probability `rate`."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the noise rate must lie in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    noisy = true_labels.copy()
    if noise_type == "symmetric":
        picked = rng.choice(len(true_labels), size=int(round(rate * len(true_labels))), replace=False)
        noisy[picked] = rng.integers(0, num_classes, size=len(picked))
    elif noise_type == "asymmetric":
        flip = rng.random(len(true_labels)) < rate
        noisy[flip] = class_map[true_labels[flip]]
    elif noise_type != "none":
        raise ValueError(f"unknown noise type '{noise_type}'; choose symmetric, asymmetric or none")
    return noisy


def noise_report(true_labels, noisy_labels, num_classes):
    """Realised noise rate and the (C, C) transition matrix T[i, j] = fraction of class-i samples labelled j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (true_labels, noisy_labels), 1)
    matrix = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return {"noise_rate": float((true_labels != noisy_labels).mean()),
            "transition_matrix": np.round(matrix, 5).tolist()}


def load_noisy_labels(path, true_labels, num_classes):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--noisy-labels {path} does not exist; pass the noisy_labels.npy of the teacher run")
    noisy = np.load(path)
    if noisy.shape != true_labels.shape or not np.issubdtype(noisy.dtype, np.integer) \
            or noisy.min() < 0 or noisy.max() >= num_classes:
        raise ValueError(f"--noisy-labels {path} holds {noisy.shape} {noisy.dtype} labels, but this training set "
                         f"needs {true_labels.shape} integers in [0, {num_classes}); was it written for another "
                         "data set or subset?")
    return noisy.astype(np.int64)


def seeded(*keys):
    """A CPU torch.Generator and a numpy Generator seeded from `keys` (e.g. seed, epoch, rank): every epoch's
    randomness is fixed by its number, so --resume needs no RNG state."""
    state = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    return torch.Generator().manual_seed(state), np.random.default_rng(state)


def augment(x, gen):
    """Pad-4 random crop + horizontal flip of a uint8 batch (B, 3, 32, 32) on its device (random draws on CPU)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    oy, ox = (torch.randint(0, 9, (b,), generator=gen).to(x.device) for _ in range(2))
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]            # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]            # (B, 1, 1, W)
    out = padded[torch.arange(b, device=x.device)[:, None, None, None],
                 torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, out.flip(3), out)


class Normalize:
    """uint8 (B, 3, H, W) → normalised float, channels_last on CUDA."""

    def __init__(self, dataset, device):
        mean, std = MEAN_STD[dataset]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.channels_last = device.type == "cuda"

    def __call__(self, x):
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def mixup(x, alpha, gen, np_rng):
    """Sel-CL's mix_data_lab: λ ~ Beta(α, α) folded to ≥ 0.5 (the original image dominates), one permutation.
    Returns mixed x, the permutation and λ (λ = 1, no mixing, when α = 0)."""
    lam = 1.0
    if alpha > 0:
        lam = float(np_rng.beta(alpha, alpha))
        lam = max(lam, 1.0 - lam)
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], perm, lam


# ---------------------------------------------------------------------------------------------------------------
# Sel-CL: confident examples, confident pairs, the selective supervised contrastive loss
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def embed_all(raw_model, x, normalize, batch_size, rank, world_size, use_amp):
    """(N, D) float32 L2-normalised embeddings of all training images without augmentation (eval-mode BN); each
    process embeds rows rank::world_size and a sum all-reduce gives every process all of them."""
    broadcast_buffers(raw_model)   # every process embeds with rank 0's BatchNorm statistics
    raw_model.eval()
    rows = torch.arange(rank, len(x), world_size, device=x.device)
    dim = raw_model.head.out_features
    out = torch.zeros(len(x), dim, device=x.device)
    for chunk in rows.split(batch_size):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out[chunk] = raw_model(normalize(x[chunk]))[1].float()
    raw_model.train()
    return F.normalize(all_reduce_sum(out), dim=1)


@torch.no_grad()
def knn_vote(embed, labels, num_classes, k, chunk=1024):
    """(N, C): fraction of each sample's k nearest neighbours (cosine similarity, itself excluded) per label."""
    n = len(embed)
    votes = torch.zeros(n, num_classes, device=embed.device)
    for start in range(0, n, chunk):
        sim = embed[start:start + chunk] @ embed.T                                     # (b, N)
        own = torch.arange(sim.shape[0], device=embed.device)
        sim[own, start + own] = -float("inf")                                          # not its own neighbour
        neighbours = sim.topk(k, dim=1).indices                                        # (b, k)
        votes[start:start + chunk].scatter_add_(1, labels[neighbours], torch.ones_like(neighbours, dtype=torch.float))
    return votes / k


@torch.no_grad()
def select_confident(embed, noisy_labels, num_classes, k=250, select_quantile=0.5, pair_quantile=0.25):
    """Sel-CL's selection (Li 2022, Sec. 3.2; official `pair_selection`). embed (N, D) unit-norm, noisy_labels (N,).

    1. kNN label correction: each sample's k neighbours vote with their noisy labels → corrected label.
    2. The neighbours vote again with their corrected labels; a sample agrees when the vote's winner is its noisy
       label; its discrepancy is −log p(noisy label) with p clamped to [0.01, 0.99].
    3. Budget per class = the `select_quantile` quantile (0.5: the lower median, as torch.median) of the number of
       agreeing samples per noisy class; each class keeps that many of its samples (at most all), lowest
       discrepancy first. These are the confident examples.
    4. Pair threshold = the `pair_quantile` quantile of the similarities of confident same-label pairs.
    Returns (selected (N,) bool, threshold float). Confident pairs are then `pair_mask`.
    """
    k = min(k, len(embed) - 1)
    corrected = knn_vote(embed, noisy_labels, num_classes, k).argmax(1)
    votes = knn_vote(embed, corrected, num_classes, k)
    discrepancy = -votes.gather(1, noisy_labels[:, None]).squeeze(1).clamp(0.01, 0.99).log()
    agrees = votes.argmax(1) == noisy_labels
    per_class = torch.bincount(noisy_labels[agrees], minlength=num_classes).float().cpu()
    if select_quantile == 0.5:
        budget = per_class.median()                 # the official code's torch.median: the lower middle value
    else:
        budget = torch.quantile(per_class, select_quantile)
    selected = torch.zeros(len(embed), dtype=torch.bool, device=embed.device)
    for c in range(num_classes):
        members = (noisy_labels == c).nonzero().squeeze(1)
        order = torch.argsort(discrepancy[members], stable=True)
        selected[members[order[:int(min(budget.item(), len(members)))]]] = True
    # quantile of the similarities of confident same-label pairs (self-pairs included, as in the official code)
    bins = 20001
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


def pair_mask(selection, noisy_labels, index):
    """(B, B) bool confident pairs among the samples `index`: same noisy label, and either both confident or
    similar enough (stored embeddings) — the official graph, built per batch."""
    z, labels, sel = selection["embed"][index], noisy_labels[index], selection["selected"][index]
    same = labels[:, None] == labels[None, :]
    return same & ((z @ z.T >= selection["threshold"]) | (sel[:, None] & sel[None, :]))


def selcl_contrastive_loss(embed, pairs, perms, lams, temperature):
    """Selective supervised contrastive loss with mixup (Sel-CL Eq. 6, MOIT form); returns (B,) per sample.

    embed (2B, D): unit-norm embeddings of view A then view B, each view mixed with its own permutation perms[v]
    and weight lams[v]. pairs (B, B) bool confident pairs. Positives of a row: the other view of its dominant image
    and the views of its confident partners (weight λ), and the same for the mixed-in image (weight 1 − λ).
    """
    b = len(pairs)
    eye = torch.eye(b, dtype=torch.bool, device=pairs.device)
    positives = (pairs | eye).repeat(1, 2)                                       # (B, 2B): image i's positives
    not_self = ~torch.eye(2 * b, dtype=torch.bool, device=pairs.device)
    with torch.autocast(embed.device.type, enabled=False):   # in bf16, logits/0.1 would lose ~4% of the gradient
        logits = embed.float() @ embed.float().T / temperature                   # (2B, 2B)
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, -float("inf")), dim=1, keepdim=True)

    def mean_log_prob(mask):                                                     # mask (2B, 2B) bool
        mask = mask & not_self
        return (mask * log_prob).sum(1) / mask.sum(1).clamp_min(1)

    dominant = positives.repeat(2, 1)                                            # (2B, 2B)
    mixed_in = torch.cat([positives[perms[0]], positives[perms[1]]])             # positives of the mixed-in image
    lam = torch.cat([torch.full((b,), lams[0]), torch.full((b,), lams[1])]).to(embed.device)
    loss = -(lam * mean_log_prob(dominant) + (1 - lam) * mean_log_prob(mixed_in))
    return loss.view(2, b).mean(0)


def mixup_ce(logits, targets, perm, lam):
    """(B,) λ·CE(s, y) + (1 − λ)·CE(s, y[perm])."""
    return lam * F.cross_entropy(logits, targets, reduction="none") + \
        (1 - lam) * F.cross_entropy(logits, targets[perm], reduction="none")


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def lr_selcl(args, epoch, step, steps_per_epoch):
    """Stage one: linear warm-up from lr/100 over --lr-warmup-epochs (per step), then ×0.1 at each milestone."""
    it, warm = epoch * steps_per_epoch + step, args.lr_warmup_epochs * steps_per_epoch
    if it < warm:
        return args.lr / 100 * (99 * it / warm + 1)
    return args.lr * 0.1 ** sum(epoch >= m for m in args.milestones)


def adaptconf_beta_scale(stage_epoch, stage_epochs):
    """β warm-up of the official noisy-label code, which counts epochs from 1 and passes epochs + 1 as the total:
    β·e/(0.25·total) while e < int(0.25·total)."""
    e, total = stage_epoch + 1, stage_epochs + 1
    return e / (0.25 * total) if e < int(0.25 * total) else 1.0


def selcl_step(ddp_model, xa, xb, pairs, x_sel, y_sel, args, gen, np_rng, warmup=False):
    """One Sel-CL step on normalised views xa, xb (B, 3, H, W) of the contrastive batch and (if x_sel is not None)
    a batch x_sel (S, 3, H, W) of confident examples with labels y_sel for the mixup classification loss.
    pairs (B, B) bool; during warm-up all False and the views unmixed (pure instance contrast). Returns
    (loss, terms)."""
    alpha = 0.0 if warmup else args.mixup_alpha
    xa, perm_a, lam_a = mixup(xa, alpha, gen, np_rng)
    xb, perm_b, lam_b = mixup(xb, alpha, gen, np_rng)
    inputs = [xa, xb]
    if x_sel is not None:
        s1, perm_s1, lam_s1 = mixup(x_sel, args.mixup_alpha, gen, np_rng)
        s2, perm_s2, lam_s2 = mixup(x_sel, args.mixup_alpha, gen, np_rng)
        inputs += [s1, s2]
    logits, embed, _ = ddp_model(torch.cat(inputs))                     # one forward: one DDP reduction per step
    b = len(xa)
    contrastive = selcl_contrastive_loss(embed[:2 * b], pairs, (perm_a, perm_b), (lam_a, lam_b),
                                         args.contrast_temp).mean()
    loss, terms = contrastive, {"contrastive": contrastive.detach()}
    if x_sel is not None:
        s = len(x_sel)
        classif = torch.cat([mixup_ce(logits[2 * b:2 * b + s].float(), y_sel, perm_s1, lam_s1),
                             mixup_ce(logits[2 * b + s:].float(), y_sel, perm_s2, lam_s2)]).mean()
        loss = loss + args.lambda_c * classif
        terms["classif"] = classif.detach()
    return loss, terms


def distill_term(args, logits, feat, t_logits, t_feat, stage_epoch):
    """The teacher's term of stage two, one if/elif over --loss (common.py). Returns (loss, extra log values)."""
    if args.loss == "kd":
        return args.kd_weight * kd_loss(logits, t_logits, T=args.kd_T), {}
    if args.loss == "rkd":
        return args.kd_weight * rkd_loss(feat, t_feat), {}
    if args.loss == "augconf":
        alpha = augconf_alpha(stage_epoch, args.finetune_epochs, args.alpha_max)
        return args.kd_weight * augconf_loss(logits, t_logits, alpha, T=args.kd_T), {"alpha": alpha}
    if args.loss == "adaptconf":
        scale = adaptconf_beta_scale(stage_epoch, args.finetune_epochs)
        loss = adaptconf_loss(logits, t_logits, tau=args.tau, T=args.kd_T, beta_scale=scale)
        return args.kd_weight * loss, {"beta": adaptconf_beta(logits, t_logits, tau=args.tau), "beta_scale": scale}
    raise ValueError(f"unknown loss '{args.loss}'")


def finetune_step(ddp_model, raw_model, teacher, x, x_clean, y, args, stage_epoch, gen, np_rng):
    """One Sel-CL+ step on a normalised augmented batch x (B, 3, H, W) of confident examples with labels y; x_clean
    is the same batch without augmentation (for the bootstrapped targets). Returns (loss, terms)."""
    x, perm, lam = mixup(x, args.mixup_alpha, gen, np_rng)
    z = None
    if stage_epoch >= args.label_correction_epoch:
        with torch.no_grad():                       # the model's own prediction on the clean image, train-mode BN
            z = raw_model(x_clean)[0].argmax(1)
    logits, _, feat = ddp_model(x)
    ce = mixup_ce(logits.float(), y, perm, lam)
    if z is not None:                               # bootstrapping (official criterionMixBoot, B = 0.2)
        ce = 0.8 * ce + 0.2 * mixup_ce(logits.float(), z, perm, lam)
    ce = ce.mean()
    loss, terms = args.gt_weight * ce, {"ce": ce.detach()}
    if teacher is not None:
        with torch.no_grad():
            t_logits, _, t_feat = teacher(x)        # the teacher sees the same mixed image
        distill, extra = distill_term(args, logits, feat, t_logits, t_feat, stage_epoch)
        loss = loss + distill
        terms["distill"] = distill.detach()
        terms.update(extra)
    return loss, terms


class EpochStats:
    """Sums loss terms (and AdaptConf's β) over the steps of one process; `result()` all-reduces them."""

    def __init__(self, device):
        self.device, self.sums, self.steps, self.extra = device, {}, 0, {}
        self.beta_hist = torch.zeros(10, device=device)
        self.beta_sum = torch.zeros(2, device=device)        # Σβ, number of β == 0.5

    def add(self, loss, terms):
        self.steps += 1
        for name, value in {"loss": loss.detach(), **terms}.items():
            if name == "beta":
                self.beta_hist += torch.histc(value.float(), 10, 0.0, 0.5)
                self.beta_sum += torch.stack([value.sum(), (value == 0.5).sum().float()])
            elif isinstance(value, torch.Tensor):
                self.sums[name] = self.sums.get(name, 0.0) + value.float()
            else:
                self.extra[name] = value

    def result(self):
        names = sorted(self.sums)
        totals = all_reduce_sum(torch.stack([self.sums[n] for n in names] +
                                            [torch.tensor(float(self.steps), device=self.device)]))
        record = {n: (totals[i] / totals[-1]).item() for i, n in enumerate(names)}
        record.update(self.extra)
        hist = all_reduce_sum(self.beta_hist.clone())   # collectives run on every rank, whatever its counts
        beta = all_reduce_sum(self.beta_sum.clone())
        if hist.sum() > 0:
            record.update(beta_mean=(beta[0] / hist.sum()).item(), beta_frac_half=(beta[1] / hist.sum()).item(),
                          beta_hist=(hist / hist.sum()).tolist())   # fractions, as in Figure 3
        return record


def shard(num, epoch, args, rank, world_size, device):
    """This process's disjoint share of a per-epoch permutation of range(num), cut to whole batches so that every
    process runs the same number of steps."""
    gen, _ = seeded(args.seed, epoch, 1_000_003)
    perm = torch.randperm(num, generator=gen)
    per_process = num // world_size
    steps = per_process // args.batch_size
    if steps == 0:
        raise ValueError(f"{num} training samples over {world_size} process(es) do not fill one batch of "
                         f"{args.batch_size}; lower --batch-size")
    return perm[rank::world_size][:steps * args.batch_size].view(steps, args.batch_size).to(device)


def train_one_epoch_selcl(ddp_model, optimizer, data, selection, epoch, args, ctx):
    """Stage one (Sel-CL). `selection` is None during the warm-up epochs."""
    ddp_model.train()
    gen, np_rng = seeded(args.seed, epoch, ctx["rank"])
    batches = shard(len(data["train_x"]), epoch, args, ctx["rank"], ctx["world_size"], ctx["device"])
    selected_idx = None if selection is None else selection["selected"].nonzero().squeeze(1)
    stats = EpochStats(ctx["device"])
    for step, index in enumerate(batches):
        lr = lr_selcl(args, epoch, step, len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = data["train_x"][index]
        xa, xb = ctx["normalize"](augment(x, gen)), ctx["normalize"](augment(x, gen))
        x_sel = y_sel = None
        if selection is None:
            pairs = torch.zeros(len(index), len(index), dtype=torch.bool, device=x.device)
        else:
            pairs = pair_mask(selection, data["noisy_y"], index)
        if selected_idx is not None and len(selected_idx):
            # confident examples for the classification loss, drawn uniformly with replacement
            pick = selected_idx[torch.randint(0, len(selected_idx), (len(index),), generator=gen).to(x.device)]
            x_sel, y_sel = ctx["normalize"](augment(data["train_x"][pick], gen)), data["noisy_y"][pick]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=ctx["use_amp"]):
            loss, terms = selcl_step(ddp_model, xa, xb, pairs, x_sel, y_sel, args, gen, np_rng,
                                     warmup=selection is None)
        check_finite(loss, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats.add(loss, terms)
    return {**stats.result(), "lr": lr, "images": batches.numel() * ctx["world_size"]}


def train_one_epoch_finetune(ddp_model, raw_model, teacher, optimizer, data, selected_idx, epoch, args, ctx):
    """Stage two (Sel-CL+): fine-tune on the confident examples, with the teacher's term when --loss is not ce."""
    ddp_model.train()
    stage_epoch = epoch - args.epochs
    if len(selected_idx) < args.batch_size * ctx["world_size"]:
        raise ValueError(f"stage one selected only {len(selected_idx)} confident examples, less than one batch per "
                         "process; lower --batch-size, or train stage one longer (see selected in log.jsonl)")
    gen, np_rng = seeded(args.seed, epoch, ctx["rank"])
    batches = shard(len(selected_idx), epoch, args, ctx["rank"], ctx["world_size"], ctx["device"])
    stats = EpochStats(ctx["device"])
    for step, position in enumerate(batches):
        index = selected_idx[position]
        x_raw = data["train_x"][index]
        x, x_clean = ctx["normalize"](augment(x_raw, gen)), ctx["normalize"](x_raw)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=ctx["use_amp"]):
            loss, terms = finetune_step(ddp_model, raw_model, teacher, x, x_clean, data["noisy_y"][index], args,
                                        stage_epoch, gen, np_rng)
        check_finite(loss, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats.add(loss, terms)
    return {**stats.result(), "lr": args.finetune_lr, "images": batches.numel() * ctx["world_size"]}


@torch.no_grad()
def evaluate(raw_model, x, y, ctx, batch_size=500):
    """(top-1, top-5) in percent of the classifier on the test set; each process takes rows rank::world_size and
    the correct counts are summed, so every test image counts exactly once."""
    broadcast_buffers(raw_model)   # every process scores its shard with rank 0's BatchNorm statistics
    raw_model.eval()
    rows = torch.arange(ctx["rank"], len(y), ctx["world_size"], device=y.device)
    counts = torch.zeros(3, device=y.device)                 # top-1 hits, top-5 hits, images
    for chunk in rows.split(batch_size):
        # float32, no autocast: bf16 logits tie or swap the top class for ~1% of images
        logits = raw_model(ctx["normalize"](x[chunk]))[0].float()
        counts[:2] += topk_correct(logits, y[chunk], (1, 5))
        counts[2] += len(chunk)
    all_reduce_sum(counts)
    raw_model.train()
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item(), int(counts[2].item())


def selection_stats(selection, clean):
    """How many examples are selected, which fraction of them carries its true label, and the base rate."""
    n = 0 if selection is None else int(selection["selected"].sum())
    return {"selected": n, "selected_clean_frac": float(clean[selection["selected"]].float().mean()) if n else None,
            "clean_frac_all": float(clean.float().mean())}


def make_optimizer(raw_model, stage, args):
    """SGD 0.9; stage one trains everything, stage two everything but the contrastive head (unused there)."""
    params = [p for name, p in raw_model.named_parameters() if stage == 1 or not name.startswith("head.")]
    return torch.optim.SGD(params, lr=args.lr if stage == 1 else args.finetune_lr, momentum=0.9,
                           weight_decay=args.weight_decay)


def benchmark(ddp_model, raw_model, teacher, args, ctx, num_classes, size=32):
    """Times --benchmark steps of each stage on random tensors (after 3 warm-up steps); prints images/s."""
    b, device = args.batch_size, ctx["device"]
    gen, np_rng = seeded(args.seed, 0, ctx["rank"])
    x_raw = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    y = torch.randint(0, num_classes, (b,), generator=gen).to(device)
    pairs = (y[:, None] == y[None, :])
    optimizer = make_optimizer(raw_model, 1, args)
    stage_two_epoch = max(args.label_correction_epoch, 0)
    for name, images_per_step, step_fn in [
        ("stage one (Sel-CL)", 4 * b, lambda xn: selcl_step(ddp_model, xn, xn, pairs, xn, y, args, gen, np_rng)),
        ("stage two (Sel-CL+)", b, lambda xn: finetune_step(ddp_model, raw_model, teacher, xn, xn, y, args,
                                                            stage_two_epoch, gen, np_rng))]:
        for i in range(3 + args.benchmark):
            if i == 3:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.time()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx["use_amp"]):
                loss, _ = step_fn(ctx["normalize"](augment(x_raw, gen)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - start
        if ctx["rank"] == 0:
            print(f"benchmark {name}: {1000 * seconds / args.benchmark:.1f} ms/step, "
                  f"{images_per_step * args.benchmark * ctx['world_size'] / seconds:.0f} images/s through the "
                  f"network (batch {b} per process, {ctx['world_size']} process(es))", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def setting_defaults(args):
    """Per-setting values of the official run scripts and KD configs, where the flag was left at None."""
    c10 = args.dataset != "cifar100"
    sym = args.noise_type == "symmetric"
    if args.kd_T is None:
        args.kd_T = (20.0 if sym else 10.0) if c10 else 1.0
    if args.select_quantile is None:
        args.select_quantile = 0.5 if c10 else (0.75 if sym else 0.25)
    if args.pair_quantile is None:
        args.pair_quantile = 0.25 if c10 else (0.35 if sym else 0.0)


def load_teacher(args, num_classes, device):
    if not args.teacher_ckpt:
        raise SystemExit(f"--loss {args.loss} distils from a teacher; pass --teacher-ckpt (e.g. the stage1_model.pt "
                         "of a --loss ce run with --model preact_resnet18)")
    state = load_state_dict(args.teacher_ckpt)
    if "linear2.weight" in state and state["linear2.weight"].shape[0] != num_classes:
        raise SystemExit(f"the teacher checkpoint {args.teacher_ckpt} classifies {state['linear2.weight'].shape[0]} "
                         f"classes but the data has {num_classes}; pass a teacher trained on this data set")
    teacher = build_model(args.teacher, num_classes)
    load_weights(teacher, state, f"teacher checkpoint {args.teacher_ckpt}")
    teacher.to(device).eval()
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def prepare_data(args, device):
    if args.dataset == "synthetic":
        data = synthetic_data(args.synthetic_classes, args.synthetic_train, args.synthetic_test, args.synthetic_size)
    else:
        data = load_cifar(args.data_dir, args.dataset)
    if args.train_subset:
        data["train_x"], data["train_y"] = data["train_x"][:args.train_subset], data["train_y"][:args.train_subset]
        if data["coarse"] is not None:
            data["coarse"] = data["coarse"][:args.train_subset]
    if args.test_subset:
        data["test_x"], data["test_y"] = data["test_x"][:args.test_subset], data["test_y"][:args.test_subset]
    num_classes, true = data["num_classes"], data["train_y"]
    if args.noisy_labels:
        noisy = load_noisy_labels(args.noisy_labels, true, num_classes)
    else:
        class_map = asymmetric_class_map(args.dataset, num_classes, true, data["coarse"])
        noisy = make_noisy_labels(true, num_classes, args.noise_type, args.noise_rate, args.noise_seed, class_map)
    data["noise"] = noise_report(true, noisy, num_classes)
    data["noisy_np"] = noisy
    data["clean"] = torch.from_numpy(noisy == true).to(device)            # only for logging the selection's purity
    data["noisy_y"] = torch.from_numpy(noisy).to(device)
    for key in ("train_x", "test_x"):
        data[key] = torch.from_numpy(np.ascontiguousarray(data[key])).to(device)
    data["test_y"] = torch.from_numpy(data["test_y"]).to(device)
    return data


def main(args):
    rank, world_size, device = setup_distributed()
    seed_everything(args.seed + rank)
    setting_defaults(args)
    use_amp = args.amp and device.type == "cuda"
    if args.out and rank == 0:
        os.makedirs(args.out, exist_ok=True)
    if args.warmup_epochs < 1 and args.epochs > 0:
        raise ValueError("--warmup-epochs must be at least 1: the first selection needs a trained embedding")
    if args.resume and not args.out:
        raise ValueError("--resume continues from <out>/checkpoint.pt; pass --out")

    data = prepare_data(args, device)
    num_classes = data["num_classes"]
    ctx = {"rank": rank, "world_size": world_size, "device": device, "use_amp": use_amp,
           "normalize": Normalize(args.dataset, device)}
    raw_model = build_model(args.model, num_classes).to(device)
    if device.type == "cuda":
        raw_model.to(memory_format=torch.channels_last)
    ddp_model = raw_model
    if world_size > 1:
        # warm-up leaves linear2 unused, stage two leaves the contrastive head unused
        ddp_model = DistributedDataParallel(raw_model, device_ids=[device] if device.type == "cuda" else None,
                                            find_unused_parameters=True)

    if args.eval_only:
        load_weights(raw_model, load_state_dict(args.eval_only), f"checkpoint {args.eval_only}")
        top1, top5, count = evaluate(raw_model, data["test_x"], data["test_y"], ctx)
        if rank == 0:
            print(f"eval-only {args.eval_only}: top1 {top1:.2f}  top5 {top5:.2f}  ({count} test images)")
            if args.out:
                save_atomic({"top1": top1, "top5": top5, "test_images": count, "checkpoint": args.eval_only,
                             "args": vars(args)}, os.path.join(args.out, "results.json"))
        cleanup_distributed()
        return {"top1": top1, "top5": top5}
    teacher = load_teacher(args, num_classes, device) if args.loss != "ce" else None
    if args.benchmark:
        benchmark(ddp_model, raw_model, teacher, args, ctx, num_classes, data["train_x"].shape[-1])
        cleanup_distributed()
        return None

    if rank == 0:
        print(f"{args.dataset}: {len(data['train_y'])} training images, {args.noise_type} noise {args.noise_rate}: "
              f"realised noise rate {data['noise']['noise_rate']:.4f}; {args.model} "
              f"({sum(p.numel() for p in raw_model.parameters()):,} parameters), loss {args.loss}, KD T {args.kd_T}")
        print(f"global batch {args.batch_size * world_size} ({args.batch_size} × {world_size}); stage one lr "
              f"{args.lr} (×0.1 at {args.milestones}), stage two lr {args.finetune_lr}; selection quantiles "
              f"α {args.select_quantile}, β {args.pair_quantile}", flush=True)
        if args.out:
            np.save(os.path.join(args.out, "noisy_labels.npy"), data["noisy_np"])
            save_atomic({"noise_type": args.noise_type, "noise_rate_requested": args.noise_rate,
                         "noise_seed": args.noise_seed, "from_file": args.noisy_labels, **data["noise"]},
                        os.path.join(args.out, "noise.json"))

    total_epochs = args.epochs + args.finetune_epochs
    start_epoch, selection, best, stage1_top = 0, None, (0.0, 0.0), None
    optimizer_stage, optimizer_state = 0, None
    if args.stage1_ckpt:
        state = load_state_dict(args.stage1_ckpt)        # says so if the file is missing
        ckpt = torch.load(args.stage1_ckpt, map_location="cpu", weights_only=False)
        if "selected" not in ckpt or not np.array_equal(ckpt.get("noisy_labels"), data["noisy_np"]):
            raise ValueError(f"--stage1-ckpt {args.stage1_ckpt} holds no selection for these noisy labels; pass the "
                             "stage1_model.pt of a noisy.py run on the same data with the same --noisy-labels")
        load_weights(raw_model, state, f"stage-one checkpoint {args.stage1_ckpt}")
        selection, start_epoch = {"selected": ckpt["selected"].to(device)}, args.epochs
        stage1_top = (ckpt["top1"], ckpt["top5"])
    if args.resume:
        path = os.path.join(args.out, "checkpoint.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume found no {path}; start the run without --resume")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        load_weights(raw_model, ckpt["model"], f"checkpoint {path}")
        start_epoch, best, stage1_top = ckpt["epoch"], tuple(ckpt["best"]), ckpt.get("stage1_top")
        optimizer_stage, optimizer_state = ckpt["optimizer_stage"], ckpt["optimizer"]
        selection = None if ckpt["selection"] is None else \
            {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in ckpt["selection"].items()}
    if rank == 0 and args.out:
        trim_log(args.out, start_epoch)         # a rerun in the same folder starts its log afresh
    if args.epochs == 0 and selection is None:
        raise ValueError("--epochs 0 skips stage one; pass --stage1-ckpt with the selection of an earlier run")
    stage_now = 1 if start_epoch < args.epochs else 2
    if optimizer_state is not None and optimizer_stage == stage_now:
        optimizer = make_optimizer(raw_model, stage_now, args)
        optimizer.load_state_dict(optimizer_state)
    elif stage_now == 1:
        optimizer, optimizer_stage = make_optimizer(raw_model, 1, args), 1

    start_time = time.time()
    top1 = top5 = None
    for epoch in range(start_epoch, total_epochs):
        t0 = time.time()
        if epoch >= args.epochs and optimizer_stage != 2:
            # stage two begins: a fresh classifier (official ReInitializeClassif), the head is no longer trained
            torch.manual_seed(args.seed + 12345)
            raw_model.linear2.reset_parameters()
            optimizer, optimizer_stage = make_optimizer(raw_model, 2, args), 2
        if epoch < args.epochs:
            record = train_one_epoch_selcl(ddp_model, optimizer, data, selection, epoch, args, ctx)
            train_seconds = time.time() - t0
            if epoch >= args.warmup_epochs - 1:
                # select confident examples and pairs for the next epoch (and for stage two after the last one)
                embed = embed_all(raw_model, data["train_x"], ctx["normalize"], 500, rank, world_size, use_amp)
                selected, threshold = select_confident(embed, data["noisy_y"], num_classes, args.knn_k,
                                                       args.select_quantile, args.pair_quantile)
                if world_size > 1:      # identical on every process by construction; rank 0's result makes sure
                    shared = torch.cat([selected.float(), torch.tensor([threshold], device=device)])
                    dist.broadcast(shared, 0)
                    selected, threshold = shared[:-1].bool(), shared[-1].item()
                selection = {"selected": selected, "threshold": threshold, "embed": embed}
        else:
            record = train_one_epoch_finetune(ddp_model, raw_model, teacher, optimizer, data,
                                              selection["selected"].nonzero().squeeze(1), epoch, args, ctx)
            train_seconds = time.time() - t0
        images = record.pop("images")
        top1, top5, test_images = evaluate(raw_model, data["test_x"], data["test_y"], ctx)
        best = max(best, (top1, top5))
        seconds = time.time() - t0
        record = {"epoch": epoch, "stage": 1 if epoch < args.epochs else 2, **record, "top1": top1, "top5": top5,
                  **selection_stats(selection, data["clean"]), "images_per_s": images / train_seconds,
                  "seconds": seconds}
        if rank == 0:
            log_record(args.out, record)
        if epoch == args.epochs - 1:
            stage1_top = (top1, top5)
            if rank == 0 and args.out:
                save_atomic({"model": raw_model.state_dict(), "selected": selection["selected"].cpu(),
                             "noisy_labels": data["noisy_np"], "epoch": epoch + 1, "args": vars(args),
                             "top1": top1, "top5": top5}, os.path.join(args.out, "stage1_model.pt"))
        if rank == 0 and args.out:
            cpu_selection = None if selection is None else \
                {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in selection.items()}
            save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "optimizer_stage": optimizer_stage, "epoch": epoch + 1, "args": vars(args),
                         "best": list(best), "stage1_top": stage1_top, "selection": cpu_selection},
                        os.path.join(args.out, "checkpoint.pt"))

    if top1 is None:          # nothing left to train (a finished run resumed): report the loaded weights
        top1, top5, test_images = evaluate(raw_model, data["test_x"], data["test_y"], ctx)
    results = {"top1": top1, "top5": top5, "best_top1": best[0], "best_top5": best[1],
               "stage1_top1": stage1_top[0] if stage1_top else None,
               "stage1_top5": stage1_top[1] if stage1_top else None,
               "test_images": test_images, "noise_rate": data["noise"]["noise_rate"],
               **selection_stats(selection, data["clean"]), "seconds": time.time() - start_time, "args": vars(args)}
    if rank == 0:
        print(f"final top1 {top1:.2f}  top5 {top5:.2f}  (best {best[0]:.2f} / {best[1]:.2f})", flush=True)
        if args.out:
            save_atomic(results, os.path.join(args.out, "results.json"))
    cleanup_distributed()
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("data and noise")
    g.add_argument("--dataset", default="cifar100", choices=["cifar10", "cifar100", "synthetic"],
                   help="CIFAR pickles under --data-dir, or a small generated learnable set")
    g.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    g.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (0: all)")
    g.add_argument("--test-subset", type=int, default=0, help="use only the first N test images (0: all)")
    g.add_argument("--synthetic-classes", type=int, default=10, help="classes of --dataset synthetic")
    g.add_argument("--synthetic-train", type=int, default=512, help="training images of --dataset synthetic")
    g.add_argument("--synthetic-test", type=int, default=256, help="test images of --dataset synthetic")
    g.add_argument("--synthetic-size", type=int, default=32, help="image side of --dataset synthetic")
    g.add_argument("--noise-type", default="symmetric", choices=["symmetric", "asymmetric", "none"],
                   help="label noise injected into the training labels")
    g.add_argument("--noise-rate", type=float, default=0.2, help="r: the paper uses 0.2 symmetric, 0.4 asymmetric")
    g.add_argument("--noise-seed", type=int, default=42, help="seed of the label noise (official seed_dataset 42)")
    g.add_argument("--noisy-labels", default=None,
                   help="read the noisy labels from this .npy (the teacher run's noisy_labels.npy) instead")
    g = p.add_argument_group("models")
    g.add_argument("--model", default="preact_resnet34", choices=sorted(MODELS), help="the network trained here")
    g.add_argument("--teacher", default="preact_resnet18", choices=sorted(MODELS), help="teacher architecture")
    g.add_argument("--teacher-ckpt", default=None, help="teacher weights (e.g. its run's stage1_model.pt)")
    g = p.add_argument_group("stage one: Sel-CL")
    g.add_argument("--epochs", type=int, default=250, help="Sel-CL epochs (0 with --stage1-ckpt)")
    g.add_argument("--lr", type=float, default=0.1, help="stage-one learning rate")
    g.add_argument("--milestones", type=int, nargs="*", default=[125, 200], help="epochs where the lr drops ×0.1")
    g.add_argument("--lr-warmup-epochs", type=int, default=5, help="linear lr warm-up from lr/100")
    g.add_argument("--warmup-epochs", type=int, default=1, help="instance-contrast-only epochs before selection")
    g.add_argument("--knn-k", type=int, default=250, help="neighbours of the kNN vote")
    g.add_argument("--select-quantile", type=float, default=None,
                   help="α: per-class budget quantile (default per setting: 0.5 CIFAR-10, 0.75/0.25 CIFAR-100 s/a)")
    g.add_argument("--pair-quantile", type=float, default=None,
                   help="β: pair-similarity quantile (default per setting: 0.25 CIFAR-10, 0.35/0.0 CIFAR-100 s/a)")
    g.add_argument("--contrast-temp", type=float, default=0.1, help="temperature of the contrastive loss")
    g.add_argument("--mixup-alpha", type=float, default=1.0, help="mixup Beta(α, α) in both stages")
    g.add_argument("--lambda-c", type=float, default=1.0, help="weight of the stage-one classification loss")
    g.add_argument("--stage1-ckpt", default=None,
                   help="skip stage one: start stage two from this stage1_model.pt (weights and selection)")
    g = p.add_argument_group("stage two: Sel-CL+ fine-tuning")
    g.add_argument("--finetune-epochs", type=int, default=70, help="fine-tuning epochs on the confident examples")
    g.add_argument("--finetune-lr", type=float, default=1e-3, help="constant fine-tuning learning rate")
    g.add_argument("--label-correction-epoch", type=int, default=30,
                   help="stage-two epoch from which targets are bootstrapped with the model's predictions")
    g = p.add_argument_group("distillation (stage two)")
    g.add_argument("--loss", default="ce", choices=["ce", "kd", "rkd", "augconf", "adaptconf"],
                   help="ce trains without a teacher; the others add the teacher's term")
    g.add_argument("--gt-weight", type=float, default=1.0, help="weight of the stage-two label term (0: teacher only)")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the teacher's term")
    g.add_argument("--kd-T", type=float, default=None, help="KD temperature (default 20/10/1 as in Table 7 configs)")
    g.add_argument("--tau", type=float, default=0.5, help="AdaptConf β temperature")
    g.add_argument("--alpha-max", type=float, default=0.5, help="AugConf final α")
    g = p.add_argument_group("optimisation and run")
    g.add_argument("--batch-size", type=int, default=128, help="per process (the recipe: 128 in total)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (momentum 0.9)")
    g.add_argument("--seed", type=int, default=1, help="seed of initialisation, shuffling and augmentation")
    g.add_argument("--out", default=None, help="output folder (log.jsonl, results.json, checkpoints); None: none")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate these weights, write results.json")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS", help="time STEPS steps of each stage")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (ignored on CPU)")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (contrastive pairs and mixup need two samples)")
    if not 0.0 <= args.noise_rate <= 1.0:
        p.error(f"--noise-rate must lie in [0, 1], got {args.noise_rate}")
    return args


if __name__ == "__main__":
    main(parse_args())
