"""Weak-to-strong distillation on ImageNet-1k: Table 4 of "Vision Superalignment" (Guo et al. 2024, arXiv 2402.03749).

A weak teacher (ResNet18, 69.75 top-1; MobileNetV1, 71.57) supervises a stronger student (ResNet34; ResNet50) with
one of the losses of Table 4: ce (from scratch), kd, fitnet, rkd, reviewkd, dkd, augconf (Eq. 1), adaptconf (Eq. 2).
Recipe (paper appendix A.1 and the official code): 100 epochs, SGD momentum 0.9, lr 0.1 for a global batch of 512
(64 per GPU x 8), x0.1 every 30 epochs, weight decay 1e-4, label smoothing 0.1, random-resized-crop 224 + flip;
evaluation resizes and centre-crops 224 (crop fraction 0.95 as in the official code; torchvision uses 0.875).

Data: any ImageFolder tree <data>/train/<class>/*.JPEG and <data>/val/<class>/*.JPEG (ImageNet with the validation
images sorted into class folders, a subset, Tiny-ImageNet once its val/ is sorted into class folders too); the
number of classes is read from the folders.

    # a teacher, or the "Student" row of Table 4 (training from scratch)
    torchrun --nproc_per_node=8 imagenet.py --data-dir /data/imagenet --model resnet18 --loss ce --out runs/r18
    # ResNet18 -> ResNet34 with AdaptConf (the teacher can also be torchvision's: --teacher-weights IMAGENET1K_V1)
    torchrun --nproc_per_node=8 imagenet.py --data-dir /data/imagenet --model resnet34 --teacher resnet18 \\
        --teacher-ckpt runs/r18/checkpoint.pt --loss adaptconf --out runs/r18_r34_adaptconf
    # MobileNetV1 -> ResNet50 with DKD
    torchrun --nproc_per_node=8 imagenet.py --data-dir /data/imagenet --model resnet50 --teacher mobilenetv1 \\
        --teacher-ckpt mv1.pth --loss dkd --out runs/mv1_r50_dkd
    # how fast is the model, and does the loader keep up with it?
    python imagenet.py --data-dir /data/imagenet --model resnet50 --benchmark 50 --workers 8
    # evaluate a checkpoint
    python imagenet.py --data-dir /data/imagenet --model resnet34 --eval-only runs/r18_r34_adaptconf/checkpoint.pt

Paper, Table 4 (top-1 %, ImageNet val; the paper reports no seed spread):
                                 ResNet18 -> ResNet34    MobileNetV1 -> ResNet50
    Teacher                             69.75                   71.57
    Student (ce, from scratch)          73.47                   76.22
    KD / FitNet / RKD                   73.68 / 70.93 / 73.65   76.52 / 73.61 / 76.45
    ReviewKD / DKD                      72.99 / 73.74           75.28 / 76.72
    AugConf / AdaptConf                 73.80 / 74.16           76.64 / 76.94
Not yet reproduced with this script: no ImageNet run and no GPU measurement were made when it was written.
"""
import argparse
import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import transforms

from common import (FeatureRegressor, ReviewKDFusion, adaptconf_beta, adaptconf_loss, augconf_alpha, augconf_loss,
                    dkd_loss, hcl_loss, hint_loss, kd_loss, rkd_loss, topk_correct)

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

LOSSES = ["ce", "kd", "fitnet", "rkd", "reviewkd", "dkd", "augconf", "adaptconf"]
FEATURE_LOSSES = ("fitnet", "rkd", "reviewkd")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/imagenet", help="ImageFolder root holding train/ and val/")
    g.add_argument("--image-size", type=int, default=224, help="training crop and evaluation crop, in pixels")
    g.add_argument("--crop-fraction", type=float, default=0.95,
                   help="eval: resize to image-size/crop-fraction, centre-crop (official 0.95, torchvision 0.875)")
    g.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per GPU/process")
    g = p.add_argument_group("models")
    g.add_argument("--model", default="resnet34", choices=sorted(MODELS), help="the student (or the model to train)")
    g.add_argument("--teacher", default=None, choices=sorted(MODELS), help="the weak teacher (any loss but ce)")
    g.add_argument("--teacher-ckpt", default=None, help="teacher weights: checkpoint path (our/mdistiller/torchvision)")
    g.add_argument("--teacher-weights", default=None,
                   help="instead of --teacher-ckpt: a torchvision weights name, e.g. IMAGENET1K_V1 (downloads)")
    g = p.add_argument_group("optimisation (paper appendix A.1)")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=int, default=64, help="images per process (8 GPUs x 64 = 512)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD lr for a global batch of 512, scaled linearly")
    g.add_argument("--lr-step", type=int, default=30, help="multiply the lr by 0.1 every this many epochs")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the ground-truth CE term")
    g.add_argument("--seed", type=int, default=0, help="seed for init, shuffling (+epoch) and augmentation (+rank)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="ce", choices=LOSSES, help="training loss (Table 4 row)")
    g.add_argument("--gt-weight", type=float, default=1.0, help="weight of CE(s, y); 0 = teacher-only training")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the kd / augconf / adaptconf term")
    g.add_argument("--kd-T", type=float, default=1.0, help="KD temperature (kd, augconf, adaptconf, dkd)")
    g.add_argument("--tau", type=float, default=0.5, help="adaptconf: temperature of beta (Eq. 2)")
    g.add_argument("--alpha-max", type=float, default=0.5, help="augconf: final alpha of Eq. 1")
    g.add_argument("--dkd-alpha", type=float, default=1.0, help="dkd: weight of TCKD")
    g.add_argument("--dkd-beta", type=float, default=2.0, help="dkd: weight of NCKD (official code 2)")
    g.add_argument("--dkd-warmup", type=int, default=0, help="dkd: epochs of linear warm-up (official 0; mdistiller 1)")
    g.add_argument("--fitnet-stage", type=int, default=1, choices=[0, 1, 2, 3],
                   help="fitnet: stage whose output is the hint (1 = the stride-8 stage, mdistiller's middle)")
    g.add_argument("--fitnet-weight", type=float, default=100.0, help="fitnet: weight of the hint MSE (mdistiller)")
    g.add_argument("--reviewkd-weight", type=float, default=1.0, help="reviewkd: weight of HCL (mdistiller ImageNet)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder for log.jsonl, results.json, checkpoint.pt")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate these weights on val/ and stop")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                   help="time STEPS steps: synthetic tensors (model-bound) vs the real loader (data-bound), then stop")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Models: torchvision ResNets, and MobileNetV1 with the parameter names of mdistiller and the official code
# ---------------------------------------------------------------------------------------------------------------

class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard 2017), width 1.0: 4,231,976 parameters with 1000 classes. Module names follow mdistiller
    and the official code (`model.<i>` Sequential of 14 conv blocks + pooling, `fc`), so their checkpoints load
    with strict=True. Global average pooling replaces their AvgPool2d(7), so that any input size works (identical
    at 224)."""

    def __init__(self, num_classes=1000):
        super().__init__()

        def conv_bn(cin, cout, stride):           # full 3x3 conv
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        def conv_dw(cin, cout, stride):           # depthwise 3x3 + pointwise 1x1
            return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                 nn.ReLU(inplace=True),
                                 nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
            [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
        self.model = nn.Sequential(conv_bn(3, 32, 2), *(conv_dw(*w) for w in widths), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(1024, num_classes)

    # the four stages end where the resolution halves next: blocks 0-3 (stride 4), 4-5 (8), 6-11 (16), 12-13 (32)
    STAGES = ((0, 4), (4, 6), (6, 12), (12, 14))

    def forward(self, x):
        return self.fc(self.model(x).flatten(1))


MODELS = {
    "resnet18": lambda num_classes: torchvision.models.resnet18(num_classes=num_classes),
    "resnet34": lambda num_classes: torchvision.models.resnet34(num_classes=num_classes),
    "resnet50": lambda num_classes: torchvision.models.resnet50(num_classes=num_classes),
    "mobilenetv1": lambda num_classes: MobileNetV1(num_classes=num_classes),
}


def forward_features(model, x):
    """Runs a torchvision ResNet or MobileNetV1 and returns (logits (B, C), [4 stage outputs (B, C_i, H/2^(i+2),
    W/2^(i+2))], pooled (B, D)): the feature maps FitNet and ReviewKD compare, the embedding RKD compares."""
    if isinstance(model, MobileNetV1):
        feats = []
        for start, end in MobileNetV1.STAGES:
            x = model.model[start:end](x)
            feats.append(x)
        pooled = model.model[14](x).flatten(1)
    elif isinstance(model, torchvision.models.ResNet):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        feats = []
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = layer(x)
            feats.append(x)
        pooled = model.avgpool(x).flatten(1)
    else:
        raise TypeError(f"forward_features knows torchvision ResNets and MobileNetV1, not {type(model).__name__}")
    return model.fc(pooled), feats, pooled


class StudentWithHead(nn.Module):
    """The student plus the trainable head of a feature loss (FitNet regressor or ReviewKD fusion; None otherwise),
    in one module so that DDP synchronises both. forward → (logits, stage features, pooled, head output or None)."""

    def __init__(self, net, head, hint_stage):
        super().__init__()
        self.net, self.head, self.hint_stage = net, head, hint_stage

    def forward(self, x):
        logits, feats, pooled = forward_features(self.net, x)
        if isinstance(self.head, FeatureRegressor):
            return logits, feats, pooled, self.head(feats[self.hint_stage])
        if isinstance(self.head, ReviewKDFusion):   # stages shallow → deep, then the pooled embedding as a 1x1 map
            return logits, feats, pooled, self.head(feats + [pooled[:, :, None, None]])
        return logits, feats, pooled, None


def build_head(args, student, teacher):
    """The trainable module that maps student features onto the teacher's, sized by a dry run at --image-size."""
    if args.loss not in ("fitnet", "reviewkd"):
        return None
    with torch.no_grad():
        x = torch.zeros(2, 3, args.image_size, args.image_size)
        _, s_feats, s_pooled = forward_features(student.eval(), x)
        _, t_feats, t_pooled = forward_features(teacher.eval(), x)
    student.train()
    if args.loss == "fitnet":
        s, t = s_feats[args.fitnet_stage], t_feats[args.fitnet_stage]
        return FeatureRegressor(s.shape[1], t.shape[1], tuple(s.shape[-2:]), tuple(t.shape[-2:]))
    return ReviewKDFusion([f.shape[1] for f in s_feats] + [s_pooled.shape[1]],
                          [f.shape[1] for f in t_feats] + [t_pooled.shape[1]],
                          [f.shape[-1] for f in t_feats] + [1], mid_channels=256)


def load_teacher(args, num_classes):
    """Builds the frozen teacher from --teacher-ckpt or --teacher-weights; every failure stops before training."""
    if args.teacher is None or (args.teacher_ckpt is None) == (args.teacher_weights is None):
        raise SystemExit(f"--loss {args.loss} distils from a teacher: pass --teacher and exactly one of "
                         "--teacher-ckpt PATH or --teacher-weights NAME")
    teacher = MODELS[args.teacher](num_classes)
    if args.teacher_ckpt is not None:
        state_dict = load_state_dict(args.teacher_ckpt)
        what = f"teacher checkpoint {args.teacher_ckpt}"
    else:
        if args.teacher == "mobilenetv1":
            raise SystemExit("torchvision has no weights for mobilenetv1; pass its checkpoint with --teacher-ckpt")
        enum = torchvision.models.get_model_weights(args.teacher)
        if args.teacher_weights not in enum.__members__:
            raise SystemExit(f"torchvision has no weights '{args.teacher_weights}' for {args.teacher}; choose one of "
                             f"{', '.join(enum.__members__)}")
        weights = enum[args.teacher_weights]
        if len(weights.meta["categories"]) != num_classes:
            raise SystemExit(f"torchvision's {args.teacher} {args.teacher_weights} predicts "
                             f"{len(weights.meta['categories'])} classes but the data has {num_classes}; use a "
                             "teacher trained on these classes (--teacher-ckpt)")
        try:
            state_dict = weights.get_state_dict(progress=False)
        except Exception as err:    # offline, proxy, corrupt cache: say so before any training happens
            raise SystemExit(f"could not download torchvision's {args.teacher} {args.teacher_weights} ({err}); "
                             "run where the network is reachable or pass --teacher-ckpt") from err
        what = f"torchvision weights {args.teacher_weights}"
    head = state_dict.get("fc.weight")
    if head is not None and head.shape[0] != num_classes:
        raise SystemExit(f"the teacher ({what}) predicts {head.shape[0]} classes but the data has {num_classes}; "
                         "train the teacher on the same class folders")
    load_weights(teacher, state_dict, what)
    teacher.eval().requires_grad_(False)
    return teacher


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def image_folder(root, split, transform):
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no {split}/ folder in --data-dir {root}; expected {path}/<class>/<image>.JPEG")
    try:
        return torchvision.datasets.ImageFolder(path, transform=transform)
    except FileNotFoundError as err:   # ImageFolder's own message names neither the flag nor the layout
        raise FileNotFoundError(f"{path} holds no class folders with images ({err}); expected "
                                f"{path}/<class>/<image>.JPEG") from None


def build_data(args, rank, world_size, splits=("train", "val")):
    """Returns (train_loader or None, val_loader, num_classes). Training: DistributedSampler (disjoint shards,
    reshuffled by set_epoch). Validation: indices rank::world_size, no padding, so every image counts once."""
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data-dir {args.data_dir} does not exist; point it at a folder holding "
                                "train/<class>/*.JPEG and val/<class>/*.JPEG")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(int(args.image_size / args.crop_fraction)),
                                  transforms.CenterCrop(args.image_size), transforms.ToTensor(), normalize])
    val_set = image_folder(args.data_dir, "val", eval_tf)
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=torch.cuda.is_available())
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world_size)), shuffle=False,
                            persistent_workers=args.workers > 0, **common)
    train_loader = None
    if "train" in splits:
        train_set = image_folder(args.data_dir, "train", train_tf)
        if train_set.classes != val_set.classes:
            raise ValueError(f"train/ has {len(train_set.classes)} classes and val/ has {len(val_set.classes)} (or "
                             f"different names) in {args.data_dir}; both need the same class folders")
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
        # drop_last: a last batch of one image would break BatchNorm. Workers are not persistent: each epoch's workers
        # draw their seeds from the re-seeded main process, so --resume replays the augmentation exactly
        train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **common)
        if len(train_loader) == 0:
            raise ValueError(f"train/ has {len(train_set)} images, fewer than one batch of {args.batch_size} per "
                             f"process on {world_size} process(es); lower --batch-size")
    return train_loader, val_loader, len(val_set.classes)


# ---------------------------------------------------------------------------------------------------------------
# Loss: one if/elif over --loss, calling common.py
# ---------------------------------------------------------------------------------------------------------------

def compute_loss(args, out, teacher_out, labels, epoch):
    """Returns (total loss, {term: scalar tensor}, β (B,) for adaptconf else None). `out` comes from
    StudentWithHead, `teacher_out` from forward_features of the teacher (None for ce)."""
    logits, feats, pooled, head_out = out
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
    if args.loss == "ce":
        return ce, {"ce": ce.detach()}, None
    t_logits, t_feats, t_pooled = teacher_out
    beta = None
    if args.loss == "kd":
        distill = args.kd_weight * kd_loss(logits, t_logits, T=args.kd_T)
    elif args.loss == "augconf":      # Eq. 1, α ramps over the first 30% of epochs
        distill = args.kd_weight * augconf_loss(logits, t_logits, augconf_alpha(epoch, args.epochs, args.alpha_max),
                                                T=args.kd_T)
    elif args.loss == "adaptconf":    # Eq. 2, per-sample β (detached), no warm-up in the classification code
        beta = adaptconf_beta(logits, t_logits, tau=args.tau)
        distill = args.kd_weight * adaptconf_loss(logits, t_logits, tau=args.tau, T=args.kd_T)
    elif args.loss == "dkd":
        # mdistiller counts epochs from 1: with --dkd-warmup 1 the full DKD term applies from the first epoch
        warmup = min((epoch + 1) / args.dkd_warmup, 1.0) if args.dkd_warmup > 0 else 1.0
        distill = warmup * dkd_loss(logits, t_logits, labels, alpha=args.dkd_alpha, beta=args.dkd_beta, T=args.kd_T)
    elif args.loss == "fitnet":
        distill = args.fitnet_weight * hint_loss(head_out, t_feats[args.fitnet_stage])
    elif args.loss == "rkd":          # distance 25 + angle 50 on the pooled embeddings
        distill = rkd_loss(pooled, t_pooled)
    elif args.loss == "reviewkd":
        distill = args.reviewkd_weight * hcl_loss(head_out, t_feats + [t_pooled[:, :, None, None]])
    else:
        raise ValueError(f"unknown --loss {args.loss}; choose one of {', '.join(LOSSES)}")
    if args.gt_weight == 0 and args.loss in FEATURE_LOSSES:
        # teacher-only training: a feature loss gives the classifier no signal, so the student also learns the
        # teacher's logits (the same choice as cifar.py and transfer.py)
        distill = distill + args.kd_weight * kd_loss(logits, t_logits, T=args.kd_T)
    total = args.gt_weight * ce + distill
    return total, {"ce": ce.detach(), "distill": distill.detach()}, beta


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------

def autocast(args, device):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")


def to_device(images, labels, device):
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_step(args, model, teacher, optimizer, images, labels, epoch, device):
    """One SGD step; returns (loss, terms, β or None)."""
    with autocast(args, device):
        teacher_out = None
        if teacher is not None:
            with torch.no_grad():
                teacher_out = forward_features(teacher, images)
        out = model(images)
        loss, terms, beta = compute_loss(args, out, teacher_out, labels, epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, terms, beta


def train_one_epoch(args, model, teacher, optimizer, loader, epoch, device):
    """Returns the epoch's mean loss terms over all processes (and β statistics for adaptconf)."""
    model.train()
    sums = {}                                                   # term → (sum over samples) on device
    beta_hist = torch.zeros(10, device=device)                  # 10 bins over [0, 0.5]
    beta_stats = torch.zeros(3, device=device)                  # Σβ, #(β == 0.5), #samples
    seen = torch.zeros(1, device=device)
    for step, (images, labels) in enumerate(loader):
        images, labels = to_device(images, labels, device)
        loss, terms, beta = train_step(args, model, teacher, optimizer, images, labels, epoch, device)
        check_finite(loss, epoch, step)
        terms["loss"] = loss.detach()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.float() * len(labels)
        seen += len(labels)
        if beta is not None:
            beta_hist += torch.histc(beta, bins=10, min=0.0, max=0.5)
            beta_stats += torch.stack([beta.sum(), (beta == 0.5).sum().float(), beta.new_tensor(float(len(beta)))])
    names = sorted(sums)
    totals = all_reduce_sum(torch.stack([sums[n] for n in names] + [seen[0]]))
    record = {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}
    if args.loss == "adaptconf":
        all_reduce_sum(beta_hist)
        all_reduce_sum(beta_stats)
        record["beta_mean"] = (beta_stats[0] / beta_stats[2]).item()
        record["beta_frac_half"] = (beta_stats[1] / beta_stats[2]).item()
        record["beta_hist"] = (beta_hist / beta_stats[2]).tolist()
    record["train_images"] = int(totals[-1].item())
    return record


@torch.no_grad()
def evaluate(args, net, loader, device):
    """Exact top-1/top-5 over the whole val set: each process counts hits on its own shard, then counts are summed."""
    net.eval()
    counts = torch.zeros(4, device=device, dtype=torch.float64)   # top-1 hits, top-5 hits, Σ CE, images
    for images, labels in loader:
        images, labels = to_device(images, labels, device)
        logits = net(images).float()   # float32, no autocast: bf16 logits tie or swap the top class for ~1% of images
        counts[:2] += topk_correct(logits, labels, topk=(1, 5)).double()
        counts[2] += F.cross_entropy(logits, labels, reduction="sum").double()
        counts[3] += len(labels)
    all_reduce_sum(counts)
    return {"top1": (100 * counts[0] / counts[3]).item(), "top5": (100 * counts[1] / counts[3]).item(),
            "val_loss": (counts[2] / counts[3]).item(), "val_images": int(counts[3].item())}


def benchmark(args, model, teacher, optimizer, train_loader, num_classes, device, rank, world_size, warmup=3):
    """Images/s of the training step on synthetic tensors (what the model allows) next to images/s of the real
    loader alone (what decoding allows), both summed over processes."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, num_classes, (args.batch_size,))
    images, labels = to_device(images, labels, device)
    model.train()
    for step in range(warmup + args.benchmark):
        if step == warmup:
            sync()
            start = time.perf_counter()
        train_step(args, model, teacher, optimizer, images, labels, 0, device)
    sync()
    model_s = time.perf_counter() - start
    def summed(rate):   # images/s of all processes together (a device tensor: NCCL reduces CUDA tensors only)
        return all_reduce_sum(torch.tensor(rate, dtype=torch.float64, device=device)).item()

    result = {"model_images_per_s": summed(args.benchmark * args.batch_size / model_s),
              "model_ms_per_step": 1000 * model_s / args.benchmark}
    if train_loader is not None:
        # the first batch includes the workers' start-up and is not timed (unless it is the only one)
        timed = max(min(args.benchmark, len(train_loader) - 1), 1)
        train_loader.sampler.set_epoch(0)
        batches = iter(train_loader)
        if len(train_loader) > 1:
            to_device(*next(batches), device)
        sync()
        start = time.perf_counter()
        for _ in range(timed):
            to_device(*next(batches), device)
        sync()
        loader_s = time.perf_counter() - start
        result.update(loader_images_per_s=summed(timed * args.batch_size / loader_s), loader_steps=timed)
        result["loader_keeps_up"] = result["loader_images_per_s"] >= result["model_images_per_s"]
    result.update(device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                  processes=world_size, batch_size=args.batch_size, image_size=args.image_size,
                  workers=args.workers, amp=args.amp and device.type == "cuda", model=args.model,
                  teacher=args.teacher, loss=args.loss, steps=args.benchmark)
    if rank == 0:
        verdict = "  |  real loader not measured (no --data-dir)"
        if "loader_images_per_s" in result:
            verdict = (f"  |  real loader ({args.workers} workers/process): {result['loader_images_per_s']:.0f} "
                       f"images/s -> " + ("the loader keeps up" if result["loader_keeps_up"] else
                                          "the loader starves the model; add --workers or CPU cores"))
        print(f"benchmark {args.model} ({args.loss}) batch {args.batch_size}x{world_size} at {args.image_size}px on "
              f"{result['device']}: synthetic {result['model_images_per_s']:.0f} images/s "
              f"({result['model_ms_per_step']:.1f} ms/step){verdict}", flush=True)
        if args.out:
            save_atomic(result, os.path.join(args.out, "benchmark.json"))
    return result


def lr_at(args, epoch, base_lr):
    """Step schedule: ×0.1 every --lr-step epochs (paper: 0.1 → 0.01 at 30 → 0.001 at 60 → 1e-4 at 90)."""
    return base_lr * 0.1 ** (epoch // args.lr_step)


def main(args):
    rank, world_size, device = setup_distributed()
    try:
        return run(args, rank, world_size, device)
    finally:
        cleanup_distributed()


def run(args, rank, world_size, device):
    start_time = time.time()
    torch.backends.cudnn.benchmark = True       # fixed input sizes: let cuDNN pick its fastest kernels
    if args.out and rank == 0:
        os.makedirs(args.out, exist_ok=True)
    seed_everything(args.seed)
    if args.loss == "ce" and args.gt_weight <= 0:
        raise SystemExit("--loss ce with --gt-weight 0 has nothing to learn from; use a distillation loss for "
                         "teacher-only training")
    if args.resume and not args.out:
        raise SystemExit("--resume continues from <out>/checkpoint.pt; pass --out")
    if args.benchmark and not os.path.isdir(args.data_dir):
        train_loader, val_loader, num_classes = None, None, 1000   # synthetic tensors only, ImageNet's 1000 classes
    else:
        splits = ("val",) if args.eval_only else ("train", "val")
        train_loader, val_loader, num_classes = build_data(args, rank, world_size, splits)

    if args.eval_only:
        net = MODELS[args.model](num_classes)
        load_weights(net, load_state_dict(args.eval_only), f"checkpoint {args.eval_only}")
        net.to(device)
        result = evaluate(args, net, val_loader, device)
        if rank == 0:
            result.update(checkpoint=args.eval_only, model=args.model, args=vars(args))
            print(f"eval {args.eval_only}: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  "
                  f"({result['val_images']} images)", flush=True)
            if args.out:
                save_atomic(result, os.path.join(args.out, "results.json"))
        return result

    teacher = None   # loaded before the student is built: a bad teacher stops the run at once
    if args.loss != "ce":
        if args.benchmark and args.teacher_ckpt is None and args.teacher_weights is None:
            teacher = MODELS[args.teacher or "resnet18"](num_classes).eval().requires_grad_(False)  # timing only
            args.teacher = args.teacher or "resnet18"
        else:
            teacher = load_teacher(args, num_classes)
    seed_everything(args.seed)      # the same student initialisation whatever the loss and teacher
    net = MODELS[args.model](num_classes)
    head = build_head(args, net, teacher)
    model = StudentWithHead(net, head, args.fitnet_stage).to(device)
    if teacher is not None:
        teacher.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    global_batch = args.batch_size * world_size
    base_lr = args.lr * global_batch / 512      # linear scaling from the paper's 0.1 at 512
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        print(f"{args.model} <- {args.teacher or 'labels'} ({args.loss}) on {device} x{world_size}: "
              f"{num_classes} classes, global batch {global_batch}, lr {base_lr:.4g}, "
              f"{sum(p.numel() for p in net.parameters()):,} student parameters", flush=True)
    if args.benchmark:
        return benchmark(args, train_model, teacher, optimizer, train_loader, num_classes, device, rank,
                         world_size)

    start_epoch, best, teacher_result = 0, {"top1": 0.0, "top5": 0.0, "epoch": -1}, None
    checkpoint_path = os.path.join(args.out, "checkpoint.pt") if args.out else None
    if args.resume:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"--resume found no {checkpoint_path}; start without --resume")
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        load_weights(net, ckpt["model"], f"checkpoint {checkpoint_path}")
        if head is not None:
            head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best, teacher_result = ckpt["epoch"], ckpt["best"], ckpt["teacher_result"]
        if rank == 0:
            trim_log(args.out, start_epoch)
            print(f"resumed from {checkpoint_path} after epoch {start_epoch}", flush=True)
    if teacher is not None and not args.resume:   # check the teacher on the same crop before spending GPU-days
        teacher_result = evaluate(args, teacher, val_loader, device)
        if rank == 0:
            print(f"teacher {args.teacher}: top1 {teacher_result['top1']:.2f}  top5 {teacher_result['top5']:.2f}",
                  flush=True)

    result = None
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        # re-seeding each epoch makes augmentation depend only on (seed, rank, epoch): --resume replays it exactly
        seed_everything(args.seed + rank + 1000 * epoch)
        train_loader.sampler.set_epoch(epoch)
        lr = lr_at(args, epoch, base_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        record = {"epoch": epoch, "lr": lr}
        if args.loss == "augconf":
            record["alpha"] = augconf_alpha(epoch, args.epochs, args.alpha_max)
        record.update(train_one_epoch(args, train_model, teacher, optimizer, train_loader, epoch, device))
        train_seconds = time.time() - epoch_start
        broadcast_buffers(model)
        result = evaluate(args, net, val_loader, device)
        record.update(top1=result["top1"], top5=result["top5"], val_loss=result["val_loss"],
                      images_per_s=record["train_images"] / train_seconds, seconds=time.time() - epoch_start)
        if result["top1"] > best["top1"] or best["epoch"] < 0:
            best = {"top1": result["top1"], "top5": result["top5"], "epoch": epoch}
        if rank == 0:
            log_record(args.out, record)
            if checkpoint_path:
                save_atomic({"model": net.state_dict(), "head": head.state_dict() if head is not None else None,
                             "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best": best,
                             "teacher_result": teacher_result, "args": vars(args)}, checkpoint_path)

    if result is None:      # resumed a finished run
        result = evaluate(args, net, val_loader, device)
    summary = {"top1": result["top1"], "top5": result["top5"], "val_loss": result["val_loss"],
               "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
               "val_images": result["val_images"], "epochs": args.epochs,
               "teacher_top1": teacher_result["top1"] if teacher_result else None,
               "seconds": time.time() - start_time, "world_size": world_size, "args": vars(args)}
    if rank == 0:
        print(f"final top1 {summary['top1']:.2f}  top5 {summary['top5']:.2f}  best top1 {summary['best_top1']:.2f} "
              f"(epoch {summary['best_epoch']})", flush=True)
        if args.out:
            save_atomic(summary, os.path.join(args.out, "results.json"))
    return summary


if __name__ == "__main__":
    main(parse_args())
