"""Weak teacher -> strong student transfer learning (paper Table 3): a ResNet50 (ImageNet) or ResNet101 (iNaturalist)
teacher supervises the fine-tuning of a ViT-B/16 initialised from the self-supervised MAE checkpoint, with ground
truth ("Teacher + GT", --gt-weight 1) or without it ("Teacher", --gt-weight 0), for the losses ce (the student
baseline), kd, fitnet, rkd, dkd, augconf and adaptconf (AdaptConf, Eq. 2 of the paper).

Recipe (MAE fine-tuning, as the paper's appendix and the official code): AdamW, lr = 5e-4 x global_batch / 256
(2e-3 at the official global batch of 1024), layer-wise lr decay 0.65, weight decay 0.05 (not on norms, biases,
position embedding and class token), 5 warm-up epochs then cosine to 1e-6 (per step), 100 epochs, drop path 0.1,
RandAugment (2 ops, magnitude 9), random erasing 0.25, mixup 0.8 / cutmix 1.0 (one of the two per batch), label
smoothing 0.1, bf16 autocast on CUDA. The class token feeds the classifier, as in the official code (MAE's own
default, global average pooling + fc_norm, is --global-pool). With mixup the teacher sees the same mixed images as
the student and the ground-truth term uses the mixed soft target.

Commands (MAE checkpoint: dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth):
  python transfer.py --data-dir /data/imagenet --pretrained mae_pretrain_vit_base.pth \
      --teacher resnet50 --teacher-ckpt resnet50_a1.pth --loss adaptconf --out runs/in1k_adaptconf
  torchrun --nproc_per_node=8 transfer.py --data-dir /data/imagenet --pretrained mae_pretrain_vit_base.pth \
      --teacher resnet50 --teacher-ckpt resnet50_a1.pth --loss adaptconf --gt-weight 0 --out runs/in1k_adaptconf_t
  torchrun --nproc_per_node=8 transfer.py --dataset inat2019 --data-dir /data/inat --pretrained \
      mae_pretrain_vit_base.pth --teacher resnet101 --teacher-ckpt r101_inat.pth --loss kd --out runs/inat_kd
Table 3 (top-1, ViT-B MAE; Teacher + GT / Teacher only): ImageNet, ResNet50 teacher 80.36: ce 83.53, kd 83.62/82.32,
fitnet 82.48/81.02, rkd 82.19/80.98, dkd 83.68/-, augconf 83.70/82.38, adaptconf 83.86/82.51. iNaturalist 2019,
ResNet101 teacher 67.42: ce 75.28, kd 75.60/71.57, fitnet 73.68/70.11, dkd 75.82/-, augconf 75.90/71.73,
adaptconf 76.03/71.99. Not reproduced here: no GPU time was available when this script was written.

Choices where the official code shows nothing for a ViT student (documented, not hidden):
- fitnet: the last block's patch tokens, as a (B, D, H/16, W/16) map, are regressed onto the teacher's last stage
  (layer4, (B, C, H/32, W/32)) with common.FeatureRegressor (3x3 stride-2 conv + BN + ReLU), weight 1.
- fitnet and rkd carry no signal for the classifier; with --gt-weight 0 they add the KD term (--kd-weight) so that
  the head learns from the teacher (the paper reports teacher-only numbers for both).
- dkd needs a target class: the argmax of the (mixed) ground-truth target; so it needs --gt-weight > 0.
- RandAugment is torchvision's with 11 magnitude bins, so m9 is 9/10 of each range as in timm; timm's
  rand-m9-mstd0.5-inc1 also jitters the magnitude and applies each op with probability 0.5.
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision import transforms
from torchvision.transforms import v2

from common import (FeatureRegressor, adaptconf_beta, adaptconf_loss, augconf_alpha, augconf_loss, dkd_loss,
                    hint_loss, kd_loss, rkd_loss, topk_correct)

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "inat2018", "inat2019"],
                   help="imagefolder: <data-dir>/train and <data-dir>/val (ImageNet or any tree); inat20xx: "
                        "torchvision INaturalist layout plus the official train20xx.json/val20xx.json")
    g.add_argument("--data-dir", default="data/imagenet", help="dataset root")
    g.add_argument("--input-size", type=int, default=224, help="training and evaluation image size")
    g.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per training process")
    g = p.add_argument_group("student")
    g.add_argument("--model", default="vit_base_patch16", choices=list(VIT_CONFIGS), help="student ViT")
    g.add_argument("--pretrained", default=None, help="MAE checkpoint (mae_pretrain_vit_base.pth); None = random init")
    g.add_argument("--global-pool", action="store_true", help="classify from mean patch token + fc_norm (MAE default) "
                                                              "instead of the class token (official code)")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    g = p.add_argument_group("optimisation (MAE fine-tuning recipe)")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=int, default=128, help="batch size PER PROCESS (8 x 128 = 1024 official)")
    g.add_argument("--blr", type=float, default=5e-4, help="base lr: lr = blr x global_batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    g.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine schedule")
    g.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up, per step")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on 1-D params/tokens)")
    g.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing of the ground-truth term")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0 = off); with both on, one per batch")
    g.add_argument("--randaug-magnitude", type=int, default=9, help="RandAugment magnitude (2 ops); 0 = off")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    g = p.add_argument_group("teacher and loss")
    g.add_argument("--teacher", default="resnet50", choices=list(TEACHERS), help="torchvision ResNet teacher")
    g.add_argument("--teacher-ckpt", default=None, help="teacher checkpoint (torchvision/timm ResNet keys)")
    g.add_argument("--teacher-weights", default=None, help="torchvision weights name, e.g. "
                                                           "ResNet50_Weights.IMAGENET1K_V2 (downloads; needs network)")
    g.add_argument("--loss", default="adaptconf", choices=["ce", "kd", "fitnet", "rkd", "dkd", "augconf", "adaptconf"],
                   help="ce = student baseline without teacher")
    g.add_argument("--gt-weight", type=float, default=1.0, help="weight of the ground-truth CE; 0 = teacher only")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the kd/augconf/adaptconf term")
    g.add_argument("--kd-T", type=float, default=1.0, help="KD temperature (also DKD's)")
    g.add_argument("--tau", type=float, default=4.0, help="adaptconf beta temperature (4.0 for MAE ViT-B)")
    g.add_argument("--alpha-max", type=float, default=0.5, help="augconf: final alpha (ramp over 30%% of epochs)")
    g.add_argument("--fitnet-weight", type=float, default=1.0, help="fitnet hint weight")
    g.add_argument("--dkd-alpha", type=float, default=1.0, help="DKD TCKD weight (official code 1)")
    g.add_argument("--dkd-beta", type=float, default=2.0, help="DKD NCKD weight (official code 2)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output directory (None: write nothing)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (the schedule still "
                                                                "spans --epochs); split long runs, test --resume")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate the student weights at CKPT and stop")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS", help="time STEPS training steps on "
                                                                             "synthetic tensors (no data needed)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
# Student: ViT with MAE/timm state_dict names (cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv,
# attn.proj, norm2, mlp.fc1, mlp.fc2}, norm | fc_norm, head), so mae_pretrain_vit_base.pth loads tensor by tensor.
# ------------------------------------------------------------------------------------------------------------------

VIT_CONFIGS = {
    "vit_base_patch16": dict(patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072),   # ViT-B/16, 86.6M params
    "vit_tiny_test": dict(patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64),            # same class, for CPU tests
}


def drop_path(x, rate, training):
    """Stochastic depth (Huang 2016): zeroes a residual branch for a random subset of samples, rescales the rest."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                  # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)                        # (B, heads, N, D/heads), scale 1/sqrt(d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)   # eps 1e-6 as MAE's vit_base_patch16
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):                                                  # (B, 3, H, W) -> (B, H/p * W/p, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, num_classes, img_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072,
                 drop_path=0.0, global_pool=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"--input-size {img_size} is not a multiple of the patch size {patch_size}")
        self.grid = img_size // patch_size
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]   # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, r) for r in rates)
        # MAE fine-tuning deletes `norm` under global pooling and adds a new `fc_norm` after the pooling
        if global_pool:
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, features=False):
        tokens = self.patch_embed(x)                                       # (B, N, D)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)                                         # (B, 1 + N, D)
        if self.global_pool:
            pooled = self.fc_norm(tokens[:, 1:].mean(dim=1))               # (B, D)
        else:
            pooled = self.norm(tokens)[:, 0]                               # (B, D): the class token
        logits = self.head(pooled)
        if not features:
            return logits
        grid = tokens[:, 1:].transpose(1, 2).reshape(len(x), -1, self.grid, self.grid)   # (B, D, H/p, W/p) for FitNet
        return logits, pooled, grid


def build_student(args, num_classes):
    return VisionTransformer(num_classes, img_size=args.input_size, drop_path=args.drop_path,
                             global_pool=args.global_pool, **VIT_CONFIGS[args.model])


def load_mae_checkpoint(model, path):
    """Loads an MAE (pre-training or fine-tuned) checkpoint into `model`, as MAE's main_finetune does: the head is new
    (re-initialised, std 2e-5), position embeddings are resized bicubically to the model's grid, decoder tensors are
    ignored, and under global pooling `norm` is unused and `fc_norm` new. Every other tensor must match; returns the
    report lines (missing/unused keys by name)."""
    sd = load_state_dict(path)
    if not {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= set(sd):
        raise ValueError(f"{path} is not an MAE ViT checkpoint (it lacks cls_token, pos_embed, patch_embed.proj and "
                         "blocks.0.attn.qkv); pass mae_pretrain_vit_base.pth or a checkpoint with the same key names")
    own = model.state_dict()
    report = []
    pos = sd["pos_embed"]
    if pos.dim() == 3 and pos.shape[1] != own["pos_embed"].shape[1] and pos.shape[2] == own["pos_embed"].shape[2]:
        old = math.isqrt(pos.shape[1] - 1)
        grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(model.grid, model.grid), mode="bicubic", align_corners=False)
        sd["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, model.grid ** 2, -1)], dim=1)
        report.append(f"pos_embed interpolated from {old}x{old} to {model.grid}x{model.grid} patches")
    new = sorted(k for k in own if k.startswith(("head.", "fc_norm.")))
    unused = sorted(k for k in sd if k not in own or k in new)
    missing = sorted(k for k in own if k not in sd and k not in new)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} encoder tensors of --model (first: '{missing[0]}'); it is not a "
                         "checkpoint of this ViT size")
    for k in own:
        if k in sd and k not in new and sd[k].shape != own[k].shape:
            raise ValueError(f"{path}: tensor '{k}' has shape {tuple(sd[k].shape)} but the model needs "
                             f"{tuple(own[k].shape)}; is it a different ViT size?")
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in new}, strict=False)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)                    # MAE: near-zero head, stable start
    nn.init.zeros_(model.head.bias)
    decoder = [k for k in unused if k.startswith(("decoder", "mask_token"))]
    other = [k for k in unused if k not in decoder]
    report.append(f"loaded {len(own) - len(new)} encoder tensors; new: {', '.join(new)}")
    if other:
        report.append(f"unused from the checkpoint: {', '.join(other)}")
    if decoder:
        report.append(f"unused MAE decoder tensors: {len(decoder)} ({decoder[0]} ...)")
    return report


def param_groups_lrd(model, weight_decay, layer_decay):
    """AdamW groups with layer-wise lr decay (MAE/BEiT): layer id 0 = patch/position embedding and class token,
    i + 1 = block i, depth + 1 = final norm and head; lr scale = layer_decay ** (depth + 1 - layer id). No weight
    decay on 1-D tensors (norms, biases) nor on pos_embed/cls_token."""
    depth = len(model.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        decay = 0.0 if p.ndim == 1 or name in ("cls_token", "pos_embed") else weight_decay
        group = groups.setdefault((layer, decay), {"params": [], "names": [], "weight_decay": decay,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------------------------
# Teacher: torchvision ResNet (timm's ResNet checkpoints, e.g. the "a1" ResNet50, use the same tensor names)
# ------------------------------------------------------------------------------------------------------------------

TEACHERS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50,
            "resnet101": torchvision.models.resnet101}


def build_teacher(args, num_classes, allow_random=False):
    """Frozen teacher in eval mode, loaded before training starts."""
    if args.teacher_ckpt:
        sd = load_state_dict(args.teacher_ckpt)
        if "fc.weight" not in sd:
            raise ValueError(f"{args.teacher_ckpt} is not a ResNet checkpoint (no 'fc.weight'); pass a torchvision or "
                             "timm ResNet checkpoint")
        what = f"teacher {args.teacher} from {args.teacher_ckpt}"
    elif args.teacher_weights:
        try:
            weights = torchvision.models.get_weight(args.teacher_weights)
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"--teacher-weights {args.teacher_weights} is not a torchvision weights name; use e.g. "
                             "ResNet50_Weights.IMAGENET1K_V2") from None
        try:
            sd = weights.get_state_dict(progress=False)
        except Exception as e:   # no network, proxy, bad cache: all end the same way for the user
            raise SystemExit(f"could not download {args.teacher_weights} ({e}); download it where there is network "
                             "and pass the file with --teacher-ckpt") from None
        what = f"teacher {args.teacher} ({args.teacher_weights})"
    elif allow_random:
        sd, what = None, "random teacher (benchmark only)"
    else:
        raise ValueError(f"--loss {args.loss} needs a teacher: pass --teacher-ckpt PATH (or --teacher-weights NAME)")
    if sd is not None and sd["fc.weight"].shape[0] != num_classes:
        raise ValueError(f"the teacher checkpoint has {sd['fc.weight'].shape[0]} classes but the data has "
                         f"{num_classes}; pass a teacher trained on this dataset")
    teacher = TEACHERS[args.teacher](num_classes=num_classes)
    if sd is not None:
        load_weights(teacher, sd, what)
    teacher.eval().requires_grad_(False)
    return teacher, what


def teacher_forward(teacher, x):
    """(logits (B, C), pooled (B, C4), last-stage map (B, C4, H/32, W/32)) of a torchvision ResNet."""
    t = teacher
    x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
    feature_map = t.layer4(t.layer3(t.layer2(t.layer1(x))))
    pooled = torch.flatten(t.avgpool(feature_map), 1)
    return t.fc(pooled), pooled, feature_map


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def rgb_loader(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def build_transforms(args):
    bicubic = transforms.InterpolationMode.BICUBIC
    train = [transforms.RandomResizedCrop(args.input_size, scale=(0.08, 1.0), interpolation=bicubic),
             transforms.RandomHorizontalFlip()]
    if args.randaug_magnitude > 0:
        # 11 bins: magnitude 9 is 9/10 of each op's range, as timm's m9 in MAE's recipe (torchvision's default 31
        # bins would make m9 three times weaker)
        train.append(transforms.RandAugment(num_ops=2, magnitude=args.randaug_magnitude, num_magnitude_bins=11,
                                            interpolation=bicubic))
    train += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    if args.reprob > 0:
        train.append(transforms.RandomErasing(p=args.reprob, value="random"))   # per-pixel normal noise, as timm
    val = [transforms.Resize(int(args.input_size / 0.875), interpolation=bicubic),   # 224 -> 256 -> centre 224
           transforms.CenterCrop(args.input_size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(train), transforms.Compose(val)


def inat_splits(root, version, train_tf, val_tf):
    """iNaturalist 2018/2019 with torchvision's INaturalist (images under <root>/<version>/<super>/<id>/, class =
    numeric id); train/val come from the official <root>/train<version>.json and val<version>.json."""
    def subset(split, tf):
        ds = torchvision.datasets.INaturalist(root, version=version, transform=tf, loader=rgb_loader, download=False)
        path = os.path.join(root, f"{split}{version}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; put the official iNaturalist {version} annotation files "
                                    f"train{version}.json and val{version}.json in {root}")
        with open(path) as f:
            wanted = {os.path.join(*img["file_name"].split("/")[-3:]) for img in json.load(f)["images"]}
        keep = [i for i, (cat, fname) in enumerate(ds.index) if os.path.join(ds.all_categories[cat], fname) in wanted]
        if not keep:
            raise ValueError(f"no image of {path} was found under {ds.root}; check --data-dir and --dataset")
        return torch.utils.data.Subset(ds, keep), len(ds.all_categories)
    (train, num_classes), (val, _) = subset("train", train_tf), subset("val", val_tf)
    return train, val, num_classes


def build_datasets(args):
    train_tf, val_tf = build_transforms(args)
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data-dir {args.data_dir} does not exist; pass the dataset root")
    if args.dataset.startswith("inat"):
        try:
            return inat_splits(args.data_dir, args.dataset[4:], train_tf, val_tf)
        except RuntimeError as e:   # torchvision: "Dataset not found or corrupted"
            version = args.dataset[4:]
            raise FileNotFoundError(f"no iNaturalist {version} images under {args.data_dir}/{version} ({e}); extract "
                                    f"train_val{version}.tar.gz in {args.data_dir} and rename train_val{version} to "
                                    f"{version} (torchvision's layout)") from None
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_dir, split)):
            raise FileNotFoundError(f"{args.data_dir} has no '{split}' folder; an image-folder dataset needs "
                                    "<data-dir>/train/<class>/*.jpg and <data-dir>/val/<class>/*.jpg")
    train = torchvision.datasets.ImageFolder(os.path.join(args.data_dir, "train"), train_tf, loader=rgb_loader)
    val = torchvision.datasets.ImageFolder(os.path.join(args.data_dir, "val"), val_tf, loader=rgb_loader)
    if train.classes != val.classes:
        raise ValueError(f"{args.data_dir}: train/ and val/ have different class folders; they must match")
    return train, val, len(train.classes)


def epoch_seed(args, rank, epoch):
    """Augmentation seed (seed + rank, new every epoch): reseeding per epoch makes --resume exact."""
    return args.seed + rank + 1000 * epoch


def train_loader(dataset, args, rank, world_size, epoch):
    """Each process gets a disjoint, equally long shard of a per-epoch permutation (same on every rank)."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch))
    per_rank = len(dataset) // world_size
    shard = perm[rank * per_rank:(rank + 1) * per_rank].tolist()
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=args.batch_size, shuffle=False, drop_last=True,
        num_workers=args.workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
        generator=torch.Generator().manual_seed(epoch_seed(args, rank, epoch)))


def build_mixer(args, num_classes):
    """torchvision v2 MixUp / CutMix, one of them per batch when both are on (timm's switch_prob 0.5)."""
    mixers = []
    if args.mixup > 0:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
    if args.cutmix > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
    return v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)


def mix_batch(images, labels, mixer, num_classes):
    """Returns the batch that BOTH student and teacher see, and its soft target (B, C), rows summing to one."""
    if mixer is None:
        return images, F.one_hot(labels, num_classes).float()
    images, targets = mixer(images, labels)
    return images, targets.float()


# ------------------------------------------------------------------------------------------------------------------
# Losses: one if/elif over --loss, calling common.py
# ------------------------------------------------------------------------------------------------------------------

def distill_step(args, student, teacher, regressor, images, labels, mixer, num_classes, epoch, step=0):
    """Forward of one batch: mixes it once, feeds the same mixed images to student and teacher, returns
    (loss, {term: value}, beta or None)."""
    images, targets = mix_batch(images, labels, mixer, num_classes)              # (B, 3, H, W), (B, C)
    use_amp = args.amp and images.is_cuda
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        s, s_pooled, s_grid = student(images, features=True)
        if args.loss != "ce":
            with torch.no_grad():
                t, t_pooled, t_map = teacher_forward(teacher, images)
    terms, beta = {}, None
    if args.gt_weight > 0:   # the (mixed, smoothed) ground truth; unused when training from the teacher only
        terms["gt"] = args.gt_weight * F.cross_entropy(s.float(), targets, label_smoothing=args.smoothing)
    if args.loss == "ce":
        pass
    elif args.loss == "kd":
        terms["kd"] = args.kd_weight * kd_loss(s, t, T=args.kd_T)
    elif args.loss == "augconf":   # Eq. 1
        alpha = augconf_alpha(epoch, args.epochs, alpha_max=args.alpha_max)
        terms["augconf"] = args.kd_weight * augconf_loss(s, t, alpha, T=args.kd_T)
    elif args.loss == "adaptconf":   # Eq. 2; β per sample, detached
        beta = adaptconf_beta(s, t, tau=args.tau)
        terms["adaptconf"] = args.kd_weight * adaptconf_loss(s, t, tau=args.tau, T=args.kd_T)
    elif args.loss == "dkd":   # target class = argmax of the mixed ground-truth target
        terms["dkd"] = dkd_loss(s, t, targets.argmax(dim=1), alpha=args.dkd_alpha, beta=args.dkd_beta, T=args.kd_T)
    elif args.loss == "fitnet":
        terms["hint"] = args.fitnet_weight * hint_loss(regressor(s_grid.float()), t_map)
    elif args.loss == "rkd":
        terms["rkd"] = rkd_loss(s_pooled, t_pooled)
    else:
        raise ValueError(f"unknown --loss {args.loss}")
    if args.loss in ("fitnet", "rkd") and args.gt_weight == 0:   # the head needs a signal: the teacher's logits
        terms["kd"] = args.kd_weight * kd_loss(s, t, T=args.kd_T)
    loss = sum(terms.values())
    check_finite(loss, epoch, step)
    return loss, {k: v.detach() for k, v in terms.items()}, beta


def check_loss_args(args):
    if args.loss == "ce" and args.gt_weight <= 0:
        raise ValueError("--loss ce trains on the ground truth alone; --gt-weight must be > 0")
    if args.loss == "dkd" and args.gt_weight <= 0:
        raise ValueError("--loss dkd needs ground-truth labels for its target class; use --gt-weight > 0 (the paper "
                         "reports no teacher-only DKD)")


# ------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------------------------------

def lr_at(args, epoch_float):
    """Per-step MAE schedule in epochs (fractional): linear warm-up, then half-cosine down to --min-lr."""
    if epoch_float < args.warmup_epochs:
        return args.lr * epoch_float / args.warmup_epochs
    progress = (epoch_float - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_one_epoch(args, student, teacher, regressor, loader, optimizer, mixer, num_classes, epoch, device):
    student.train()
    if regressor is not None:
        regressor.train()
    steps = len(loader)
    # running sums stay on the device: no host sync per step beyond check_finite
    sums, n_steps, beta_stats = {}, 0, torch.zeros(13, dtype=torch.float64, device=device)   # hist(10), ==0.5, Σβ, n
    start = time.time()
    for step, (images, labels) in enumerate(loader):
        lr = lr_at(args, epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        loss, terms, beta = distill_step(args, student, teacher, regressor, images, labels, mixer, num_classes,
                                         epoch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in {"loss": loss.detach(), **terms}.items():
            sums[k] = sums.get(k, 0.0) + v.double()
        if beta is not None:
            beta = beta.float()
            beta_stats += torch.cat([torch.histc(beta, bins=10, min=0.0, max=0.5), (beta == 0.5).sum().view(1),
                                     beta.sum().view(1), torch.tensor([len(beta)], device=device)]).double()
        n_steps += 1
    # mean over steps and processes; β statistics pooled over every sample of every process
    keys = sorted(sums)
    packed = torch.cat([torch.stack([sums[k] for k in keys]), torch.tensor([n_steps], device=device).double(),
                        beta_stats])
    packed = all_reduce_sum(packed).cpu()
    total_steps = packed[len(keys)].item()
    hist, (beta_half, beta_sum, n_beta) = packed[len(keys) + 1:len(keys) + 11], packed[len(keys) + 11:].tolist()
    stats = {k: packed[i].item() / max(total_steps, 1) for i, k in enumerate(keys)}
    stats["lr"] = lr_at(args, epoch + (steps - 1) / max(steps, 1))               # lr of the epoch's last step
    stats["images_per_s"] = total_steps * args.batch_size / max(time.time() - start, 1e-9)   # all processes
    if n_beta:
        stats.update(beta_mean=beta_sum / n_beta, beta_frac_half=beta_half / n_beta,
                     beta_hist=(hist / n_beta).tolist())
    return stats


@torch.no_grad()
def evaluate(forward, dataset, args, rank, world_size, device):
    """Top-1/top-5 in percent over the whole set: each process takes indices rank::world_size (no padding), the
    correct counts and totals are summed over processes."""
    if isinstance(forward, nn.Module):
        forward.eval()   # no drop path: score the deterministic model that is saved (train_one_epoch sets .train())
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                                         pin_memory=torch.cuda.is_available())
    counts = torch.zeros(3, dtype=torch.float64, device=device)             # top1, top5, total
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        logits = forward(images)   # float32, no autocast: bf16 logits tie or swap the top class for ~1% of images
        counts[:2] += topk_correct(logits.float(), labels, (1, 5)).to(counts)
        counts[2] += len(labels)
    all_reduce_sum(counts)
    top1, top5, total = counts.tolist()
    return 100.0 * top1 / max(total, 1), 100.0 * top5 / max(total, 1), int(total)


def benchmark(args, student, teacher, regressor, optimizer, mixer, num_classes, device, rank):
    """Times --benchmark training steps on synthetic tensors after 3 warm-up steps."""
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, num_classes, (args.batch_size,), device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    student.train()
    for group in optimizer.param_groups:
        group["lr"] = args.lr * group["lr_scale"]
    for i in range(3 + args.benchmark):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.time()
        loss, _, _ = distill_step(args, student, teacher, regressor, images, labels, mixer, num_classes, 0, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1000 * (time.time() - start) / args.benchmark
    result = {"ms_per_step": ms, "images_per_s": args.batch_size * 1000 / ms, "batch_size": args.batch_size,
              "model": args.model, "loss": args.loss, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu"}
    if rank == 0:
        print(f"benchmark: {ms:.1f} ms/step, {result['images_per_s']:.0f} images/s per process "
              f"(batch {args.batch_size}, {result['device']})", flush=True)
        if args.out:
            save_atomic(result, os.path.join(args.out, "benchmark.json"))
    return result


def main(args):
    rank, world_size, device = setup_distributed()
    try:
        return run(args, rank, world_size, device)
    finally:
        cleanup_distributed()


def run(args, rank, world_size, device):
    check_loss_args(args)
    seed_everything(args.seed + rank)
    if args.out and rank == 0:
        os.makedirs(args.out, exist_ok=True)
    say = print if rank == 0 else (lambda *a, **k: None)
    global_batch = args.batch_size * world_size
    if args.lr is None:
        args.lr = args.blr * global_batch / 256
    if args.benchmark:
        train_set, val_set, num_classes = None, None, 1000
    else:
        train_set, val_set, num_classes = build_datasets(args)
    student = build_student(args, num_classes)
    if args.eval_only:
        load_weights(student, load_state_dict(args.eval_only), f"student from {args.eval_only}")
    elif args.pretrained:
        for line in load_mae_checkpoint(student, args.pretrained):
            say(f"MAE checkpoint {args.pretrained}: {line}")
    else:
        say("no --pretrained: the ViT starts from random weights (Table 3 needs mae_pretrain_vit_base.pth)")
    student.to(device)
    if device.type == "cuda":
        student.to(memory_format=torch.channels_last)
    teacher = regressor = None
    if args.loss != "ce" and not args.eval_only:
        teacher, what = build_teacher(args, num_classes, allow_random=bool(args.benchmark))
        teacher.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
        say(f"teacher: {what}")
        if args.loss == "fitnet":   # student token grid (H/16) -> teacher last stage (H/32): 3x3 conv stride 2
            with torch.no_grad():
                t_map = teacher_forward(teacher, torch.zeros(1, 3, args.input_size, args.input_size, device=device))[2]
            regressor = FeatureRegressor(student.head.in_features, t_map.shape[1], student.grid, t_map.shape[-1])
            regressor.to(device)
    say(f"student {args.model}: {sum(p.numel() for p in student.parameters()):,} parameters; {num_classes} classes")

    if args.eval_only:
        top1, top5, total = evaluate(student, val_set, args, rank, world_size, device)
        say(f"eval {args.eval_only}: top1 {top1:.2f}  top5 {top5:.2f}  ({total} images)")
        if args.out and rank == 0:
            save_atomic({"top1": top1, "top5": top5, "val_images": total, "checkpoint": args.eval_only,
                         "args": vars(args)}, os.path.join(args.out, "results.json"))
        return {"top1": top1, "top5": top5, "val_images": total}

    groups = param_groups_lrd(student, args.weight_decay, args.layer_decay)
    if regressor is not None:
        groups.append({"params": list(regressor.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=args.lr)
    model = DDP(student) if world_size > 1 else student   # DDP syncs gradients; `student` stays for saving/eval
    reg = DDP(regressor) if world_size > 1 and regressor is not None else regressor
    mixer = build_mixer(args, num_classes)
    say(f"global batch {global_batch} ({world_size} x {args.batch_size}); lr {args.lr:.3g} "
        f"(blr {args.blr:g} x {global_batch}/256 unless --lr); layer decay {args.layer_decay}; loss {args.loss}, "
        f"gt weight {args.gt_weight}")
    if args.benchmark:
        return benchmark(args, model, teacher, reg, optimizer, mixer, num_classes, device, rank)

    if len(train_set) // world_size < args.batch_size:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch of {args.batch_size} "
                         f"per process on {world_size} processes; lower --batch-size")
    start_epoch, best, history_seconds, teacher_top1 = 0, {"top1": -1.0, "top5": -1.0, "epoch": -1}, 0.0, None
    ckpt_path = os.path.join(args.out, "checkpoint.pt") if args.out else None
    if args.resume:
        if not ckpt_path or not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume needs {ckpt_path or '<out>/checkpoint.pt'}; pass the --out of the run "
                                    "to continue")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        load_weights(student, ckpt["model"], f"student from {ckpt_path}")
        optimizer.load_state_dict(ckpt["optimizer"])
        if regressor is not None:
            regressor.load_state_dict(ckpt["regressor"])
        start_epoch, best, history_seconds = ckpt["epoch"], ckpt["best"], ckpt["seconds"]
        teacher_top1 = ckpt["teacher_top1"]
        if rank == 0:
            trim_log(args.out, start_epoch)
        say(f"resumed from {ckpt_path} after epoch {start_epoch}")

    if teacher is not None and start_epoch == 0:   # how weak the teacher is on this validation set
        teacher_top1, teacher_top5, _ = evaluate(teacher, val_set, args, rank, world_size, device)
        say(f"teacher top1 {teacher_top1:.2f}  top5 {teacher_top5:.2f}")
    start = time.time()
    end_epoch = min(args.epochs, args.stop_after) if args.stop_after else args.epochs
    top1 = top5 = total = None
    for epoch in range(start_epoch, end_epoch):
        epoch_start = time.time()
        torch.manual_seed(epoch_seed(args, rank, epoch))   # drop path, mixup, in-process augmentation
        loader = train_loader(train_set, args, rank, world_size, epoch)
        stats = train_one_epoch(args, model, teacher, reg, loader, optimizer, mixer, num_classes, epoch, device)
        top1, top5, total = evaluate(student, val_set, args, rank, world_size, device)
        if top1 > best["top1"]:
            best = {"top1": top1, "top5": top5, "epoch": epoch}
        record = {"epoch": epoch, **{k: v for k, v in stats.items() if k != "beta_hist"}, "top1": top1, "top5": top5,
                  "val_images": total, "seconds": time.time() - epoch_start}
        if "beta_hist" in stats:
            record["beta_hist"] = stats["beta_hist"]
        if teacher_top1 is not None and epoch == 0:
            record["teacher_top1"] = teacher_top1
        if rank == 0:
            log_record(args.out, record)
            if ckpt_path:
                save_atomic({"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                             "regressor": regressor.state_dict() if regressor is not None else None,
                             "epoch": epoch + 1, "args": vars(args), "best": best, "teacher_top1": teacher_top1,
                             "seconds": history_seconds + time.time() - start}, ckpt_path)
    if top1 is None:   # resumed a run that had already finished: report the weights as they are
        top1, top5, total = evaluate(student, val_set, args, rank, world_size, device)
    results = {"top1": top1, "top5": top5, "best_top1": best["top1"], "best_top5": best["top5"],
               "best_epoch": best["epoch"], "teacher_top1": teacher_top1, "val_images": total,
               "epochs_done": max(start_epoch, end_epoch), "seconds": history_seconds + time.time() - start,
               "args": vars(args)}
    if rank == 0 and args.out:
        save_atomic(results, os.path.join(args.out, "results.json"))
    return results


if __name__ == "__main__":
    main(parse_args())
