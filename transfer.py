"""Table 3: a weak ResNet teacher (ResNet50 on ImageNet, ResNet101 on iNaturalist 2018) supervises the fine-tuning of
an MAE-pretrained ViT-B/16, with ground truth (--gt-weight 1) or from the teacher alone (--gt-weight 0), for the losses
ce (student baseline), kd, fitnet, rkd, dkd, augconf and adaptconf (Eq. 2), with MAE's fine-tuning recipe.

  python transfer.py --data-dir /data/imagenet --pretrained mae_pretrain_vit_base.pth --teacher resnet50 \
      --teacher-ckpt resnet50_a1_0-14fe96d1.pth --loss adaptconf --out runs/t3a_adaptconf_gt
  torchrun --nproc_per_node=8 transfer.py --dataset inat2018 --data-dir /data/inat --pretrained \
      mae_pretrain_vit_base.pth --teacher resnet101 --teacher-ckpt r101_inat.pth --loss kd --gt-weight 0 --out runs/x
  python transfer.py --loss adaptconf --benchmark 50      # synthetic images, random teacher: images/s, ms/step

Paper, Table 3 (top-1, Teacher + GT / Teacher only): ImageNet, ResNet50 teacher 80.36: ce 83.53, kd 83.62/82.32,
adaptconf 83.86/82.51; iNaturalist 2018, ResNet101 teacher 67.42: ce 75.28, kd 75.60/71.57, adaptconf 76.03/71.99.
Augmentation in timm's order: random-resized crop (bilinear or bicubic) and flip in the workers, then batched on the
device RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0, erasing 0.25 (pixel). Eval: bicubic 248, crop 224.
Where we differ from the official code, or it shows nothing for a ViT student:
- Normalisation: ImageNet mean/std for student and teacher (one shared tensor), not timm 0.6.12's (0.5, 0.5) config
  of vit_base_patch16_224 (which the official teacher saw too): the teachers and MAE were trained with ImageNet's.
- RandAugment's rotate/shear/translate are bilinear (timm draws bilinear or bicubic per op): one batched warp.
- mixup/cutmix pair each image with its batch neighbour (timm: the mirrored batch) and mix float images (timm: uint8).
- fitnet, rkd (no official version for a ViT): the last block's patch tokens (B, D, H/16, W/16) are regressed onto the
  teacher's layer4 map (common.FeatureRegressor), rkd uses pooled features; with --gt-weight 0 both add the KD term.
- dkd's target class is the argmax of the mixed ground-truth target (official), so dkd needs --gt-weight > 0.
- lr: MAE's per-step warm-up from 0, then cosine; the official timm scheduler steps per epoch, warm-up from 1e-4.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision import transforms
from torchvision.datasets.folder import default_loader

from common import (FeatureRegressor, adaptconf_beta, adaptconf_loss, augconf_alpha, augconf_loss, beta_counts,
                    beta_summary, dkd_loss, hint_loss, kd_loss, rand_augment, rkd_loss, topk_correct)

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


# ---- student: ViT with MAE/timm's tensor names, so that mae_pretrain_vit_base.pth loads tensor by tensor ----------

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
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):                                                  # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)                        # (B, heads, N, D/heads), scale 1/sqrt(d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)   # eps 1e-6 as MAE's vit_base_patch16
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, mlp_dim), act=nn.GELU(), fc2=nn.Linear(mlp_dim, dim)))
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class VisionTransformer(nn.Module):
    def __init__(self, num_classes, img_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072,
                 drop_path=0.0, global_pool=False):
        super().__init__()
        self.grid, self.global_pool = img_size // patch_size, global_pool
        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)))
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
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)            # (B, 3, H, W) -> (B, N = H/p * W/p, D)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)                                         # (B, 1 + N, D)
        if self.global_pool:
            pooled = self.fc_norm(tokens[:, 1:].mean(dim=1))               # (B, D)
        else:
            pooled = self.norm(tokens)[:, 0]                               # (B, D): the class token
        with torch.autocast(x.device.type, enabled=False):   # float32 head: its logits feed β (Eq. 2), bf16 ones tie
            logits = self.head(pooled.float())
        if not features:
            return logits
        grid = tokens[:, 1:].transpose(1, 2).reshape(len(x), -1, self.grid, self.grid)   # (B, D, H/p, W/p) for FitNet
        return logits, pooled, grid


def build_student(args, num_classes):
    return VisionTransformer(num_classes, img_size=args.image_size, drop_path=args.drop_path,
                             global_pool=args.global_pool, **VIT_CONFIGS[args.model])


def load_mae_checkpoint(model, path):
    """Loads an MAE (pre-training or fine-tuned) checkpoint into `model`, as MAE's main_finetune does: the head is new
    (re-initialised, std 2e-5), position embeddings are resized bicubically to the model's grid, decoder tensors are
    ignored, and under global pooling `norm` is unused and `fc_norm` new. Every other tensor must match; returns the
    report lines (missing/unused keys by name)."""
    sd = load_state_dict(path, "--pretrained")
    if not {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= set(sd):
        raise UserError(f"--pretrained {path} is not an MAE ViT checkpoint (it lacks cls_token, pos_embed, patch_embed."
                        "proj, blocks.0.attn.qkv); pass mae_pretrain_vit_base.pth or a checkpoint with MAE's key names")
    own, report = model.state_dict(), []
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
        raise UserError(f"--pretrained {path} lacks {len(missing)} encoder tensors of --model (first: '{missing[0]}'); "
                        "it is not a checkpoint of this ViT size")
    for k in own:
        if k in sd and k not in new and sd[k].shape != own[k].shape:
            raise UserError(f"--pretrained {path}: tensor '{k}' has shape {tuple(sd[k].shape)} but the model needs "
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


# ---- teacher: torchvision ResNet (timm's ResNet checkpoints, e.g. the "a1" ResNet50, use the same tensor names) ---

TEACHERS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50,
            "resnet101": torchvision.models.resnet101}


def build_teacher(args, num_classes):
    """Frozen teacher in eval mode; without --teacher-ckpt (only allowed under --benchmark) it keeps random weights."""
    teacher = TEACHERS[args.teacher](num_classes=num_classes).eval().requires_grad_(False)
    if args.teacher_ckpt:
        sd = load_state_dict(args.teacher_ckpt, "--teacher-ckpt")
        if "fc.weight" not in sd:
            raise UserError(f"--teacher-ckpt {args.teacher_ckpt} is not a ResNet checkpoint (no 'fc.weight'); pass a "
                            "torchvision or timm ResNet checkpoint")
        if sd["fc.weight"].shape[0] != num_classes:
            raise UserError(f"--teacher-ckpt {args.teacher_ckpt} has {sd['fc.weight'].shape[0]} classes but the data "
                            f"has {num_classes}; pass a teacher trained on this dataset")
        load_weights(teacher, sd, f"--teacher-ckpt {args.teacher_ckpt} (--teacher {args.teacher})")
    return teacher


def teacher_forward(t, x):
    """(logits (B, C), pooled (B, C4), last-stage map (B, C4, H/32, W/32)) of a torchvision ResNet `t`."""
    x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
    feature_map = t.layer4(t.layer3(t.layer2(t.layer1(x))))
    pooled = torch.flatten(t.avgpool(feature_map.float()), 1)   # float32 for the head and RKD
    with torch.autocast(x.device.type, enabled=False):   # float32 logits: argmax t picks β's class (Eq. 2)
        return t.fc(pooled.float()), pooled, feature_map


# ---- data ---------------------------------------------------------------------------------------------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet's, for student and teacher (docstring)


def build_transforms(args):
    """(train, val) per image in the DataLoader workers. train: timm's random-resized crop (interpolation "random":
    bilinear or bicubic) and flip -> uint8 (3, H, W); augment() does the rest on the device. val: timm's eval crop
    for ViT-B (crop_pct 0.9, bicubic: 224 <- 248), normalised."""
    size, modes = args.image_size, (transforms.InterpolationMode.BILINEAR, transforms.InterpolationMode.BICUBIC)
    train = [transforms.RandomChoice([transforms.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=m)
                                      for m in modes]), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    val = [transforms.Resize(math.floor(size / 0.9), interpolation=modes[1]), transforms.CenterCrop(size),
           transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(train), transforms.Compose(val)


class BadImage(Exception):
    """An image file PIL cannot decode: raised by read_image, caught by Checked in the same (worker) process."""


def read_image(path):   # torchvision's default_loader (PIL, RGB), naming the file that cannot be decoded
    try:
        return default_loader(path)
    except Exception as e:
        raise BadImage(f"{path} ({type(e).__name__}: {str(e).strip()[:120]})") from None


class Checked(torch.utils.data.Dataset):
    """(image, label, "" or the unreadable file it stands in for): the worker puts a readable image in place of one
    it cannot decode (raising would end the run with a traceback); the main process stops naming it, or counts it."""
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        for k in range(10):   # the k-th stand-in a tenth of the set further: a folder of broken files is left at once
            try:
                return (*self.dataset[(i + k * (len(self) // 10 + 1)) % len(self)], bad if k else "")
            except BadImage as e:
                bad = bad if k else str(e)   # the file asked for
        raise BadImage(f"ten images in a row cannot be read, the first {bad}; check the data set")


def count_bad(args, paths=()):   # the unreadable images of a batch (Checked): stop naming the first, or count them
    bad = [path for path in paths if path]
    if bad and not args.skip_bad_images:
        raise UserError(f"cannot read the image {bad[0]}; replace or delete it, or pass --skip-bad-images")
    return len(bad)


def inat_split(args, split, transform):
    """(one split of iNaturalist 2018/2019, number of classes): torchvision's INaturalist (images under
    <data-dir>/<version>/<super>/<id>/, class = numeric id), the images of the official <data-dir>/<split><version>.json
    only."""
    root, version = args.data_dir, args.dataset[4:]
    try:
        ds = torchvision.datasets.INaturalist(root, version=version, transform=transform, loader=read_image)
    except RuntimeError as e:   # torchvision: "Dataset not found or corrupted"
        raise UserError(f"--data-dir: no iNaturalist {version} images under {root}/{version} ({e}); extract "
                        f"train_val{version}.tar.gz there and rename train_val{version} to {version}") from None
    path = os.path.join(root, f"{split}{version}.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; put the official iNaturalist {version} annotation files "
                        f"train{version}.json and val{version}.json in {root}")
    with open(path) as f:
        wanted = {os.path.join(*img["file_name"].split("/")[-3:]) for img in json.load(f)["images"]}
    keep = [i for i, (cat, fname) in enumerate(ds.index) if os.path.join(ds.all_categories[cat], fname) in wanted]
    if not keep:
        raise UserError(f"no image of {path} was found under {ds.root}; check --data-dir and --dataset")
    return torch.utils.data.Subset(ds, keep), len(ds.all_categories)


def build_datasets(args):
    train_tf, val_tf = build_transforms(args)
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir} does not exist; pass the dataset root")
    if args.dataset.startswith("inat"):
        (train, num_classes), (val, _) = inat_split(args, "train", train_tf), inat_split(args, "val", val_tf)
        return train, val, num_classes
    try:   # torchvision: FileNotFoundError for a missing split folder or a class folder without images
        train, val = (torchvision.datasets.ImageFolder(os.path.join(args.data_dir, split), tf, loader=read_image)
                      for split, tf in (("train", train_tf), ("val", val_tf)))
    except FileNotFoundError as e:
        raise UserError(f"--data-dir {args.data_dir}: {str(e).rstrip('.')}; an image-folder dataset needs "
                        "<data-dir>/train/<class>/*.jpg and <data-dir>/val/<class>/*.jpg") from None
    if train.classes != val.classes:
        raise UserError(f"--data-dir {args.data_dir}: train/ and val/ have different class folders; they must match")
    return train, val, len(train.classes)


def load_data(args, rank, world_size, device):
    """(train_set, val_loader, num_classes): train_one_epoch shards and shuffles train_set anew every epoch; val_loader
    holds this process's validation images rank::world_size (no padding: evaluate counts every image once). Under
    --benchmark: synthetic images of the real size through the training augmentation, max(STEPS, 5) batches per
    process, and no val_loader."""
    if args.benchmark:
        num_classes = {"inat2018": 8142, "inat2019": 1010}.get(args.dataset, 1000)
        n = max(args.benchmark, 5) * args.batch_size * world_size
        return torchvision.datasets.FakeData(n, (3, args.image_size, args.image_size), num_classes,
                                             build_transforms(args)[0]), None, num_classes
    train_set, val_set, num_classes = build_datasets(args)
    if not args.eval_only and len(train_set) // world_size < args.batch_size:   # --eval-only trains nothing
        raise UserError(f"the training set has {len(train_set)} images, fewer than one batch of {args.batch_size} "
                        f"per process on {world_size} processes; lower --batch-size")
    train_set, val_set = Checked(train_set), Checked(val_set)
    shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, num_workers=args.workers,
                                             pin_memory=device.type == "cuda")
    return train_set, val_loader, num_classes


def mix(images, labels, num_classes, rng):
    """MAE's mixup 0.8 or cutmix 1.0 (one per batch) with the batch neighbour, as torchvision's v2.MixUp/CutMix, on the
    device from Python-drawn numbers (nothing is read back) -> (mixed images, (B, C) soft target)."""
    rolled, (H, W), target = images.roll(1, 0), images.shape[-2:], F.one_hot(labels, num_classes).float()
    if rng.random() < 0.5:   # mixup: λ·x + (1 − λ)·neighbour
        lam = rng.betavariate(0.8, 0.8)
        images = images * lam + rolled * (1.0 - lam)
    else:   # cutmix: the neighbour's box of about 1 − λ of the area, centred anywhere, clipped; λ = the area left
        r = 0.5 * math.sqrt(1.0 - rng.betavariate(1.0, 1.0))
        h, w, cy, cx = int(r * H), int(r * W), rng.randrange(H), rng.randrange(W)
        y1, y2, x1, x2 = max(cy - h, 0), min(cy + h, H), max(cx - w, 0), min(cx + w, W)
        images = images.clone()
        images[..., y1:y2, x1:x2] = rolled[..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (H * W)
    return images, target * lam + target.roll(1, 0) * (1.0 - lam)


def random_erase(images, generator, p=0.25, attempts=10):
    """timm's RandomErasing(p, mode="pixel", max_count=1) on a normalised (B, 3, H, W) batch on its device: with
    probability p an image gets the first of 10 random boxes that fits (area 2%-1/3 of the image, aspect 0.3-1/0.3
    log-uniform) filled with N(0, 1) noise per pixel. Draws in float64 as timm's Python floats."""
    B, _, H, W = images.shape
    u = lambda *shape: torch.rand(shape, generator=generator, device=images.device, dtype=torch.float64)  # noqa: E731
    area = H * W * (0.02 + (1 / 3 - 0.02) * u(B, attempts))                                    # (B, attempts)
    aspect = torch.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * u(B, attempts))
    h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (h < H) & (w < W)
    first = fits.double().argmax(1, keepdim=True)                                            # (B, 1)
    erase = (u(B, 1) < p) & fits.any(1, keepdim=True)
    h, w = h.gather(1, first), w.gather(1, first)
    top, left = (u(B, 1) * (H - h + 1)).floor(), (u(B, 1) * (W - w + 1)).floor()            # timm's randint(0, H - h)
    ys, xs = torch.arange(H, device=images.device).view(H, 1), torch.arange(W, device=images.device)
    box = (erase.view(B, 1, 1) & (ys >= top.view(B, 1, 1)) & (ys < (top + h).view(B, 1, 1))
           & (xs >= left.view(B, 1, 1)) & (xs < (left + w).view(B, 1, 1)))                   # (B, H, W)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return torch.where(box.unsqueeze(1), noise, images)


def augment(images, labels, num_classes, generator, rng):
    """The rest of timm's training augmentation on the device, in its prefetcher's order: RandAugment
    rand-m9-mstd0.5-inc1 per image on the uint8 crops (fill: the mean colour), ImageNet normalisation, mixup/cutmix,
    random erasing 0.25 -> (images (B, 3, H, W) float32, (B, C) soft targets)."""
    images = rand_augment(images, generator, magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5,
                          fill=tuple(round(255 * m) for m in MEAN))   # timm's img_mean (124, 116, 104)
    images = torch.stack([(images[:, c].float() / 255 - MEAN[c]) / STD[c] for c in range(3)], 1)
    images, targets = mix(images, labels, num_classes, rng)
    return random_erase(images, generator), targets


# ---- loss, schedule, training and evaluation ----------------------------------------------------------------------

def loss_terms(args, epoch, student_out, teacher_out, labels):
    """{term: scalar}; the training loss is their sum. student_out: (logits (B, C), pooled (B, D), token grid), the
    grid already through the FitNet regressor (fitnet only); teacher_out: (logits, pooled (B, C4), layer4 map
    (B, C4, H/32, W/32)), None for ce; labels: the mixed ground-truth soft target (B, C)."""
    s, s_pooled, s_grid = student_out
    terms = {}
    if args.gt_weight > 0:   # the (mixed, smoothed) ground truth; unused when training from the teacher only
        terms["gt"] = args.gt_weight * F.cross_entropy(s.float(), labels, label_smoothing=args.label_smoothing)
    if args.loss == "ce":
        return terms
    t, t_pooled, t_map = teacher_out
    if args.loss == "kd":
        terms["kd"] = args.kd_weight * kd_loss(s, t, T=args.kd_T)
    elif args.loss == "augconf":   # Eq. 1
        alpha = augconf_alpha(epoch, args.epochs, alpha_max=args.alpha_max)
        terms["augconf"] = args.kd_weight * augconf_loss(s, t, alpha, T=args.kd_T)
    elif args.loss == "adaptconf":   # Eq. 2; β per sample, detached
        terms["adaptconf"] = args.kd_weight * adaptconf_loss(s, t, tau=args.tau, T=args.kd_T)
    elif args.loss == "dkd":   # target class = argmax of the mixed ground-truth target
        terms["dkd"] = dkd_loss(s, t, labels.argmax(dim=1), alpha=args.dkd_alpha, beta=args.dkd_beta, T=args.dkd_T)
    elif args.loss == "fitnet":
        terms["fitnet"] = args.fitnet_weight * hint_loss(s_grid, t_map)
    elif args.loss == "rkd":
        terms["rkd"] = rkd_loss(s_pooled, t_pooled)
    else:
        raise ValueError(f"unknown --loss {args.loss}")
    if args.loss in ("fitnet", "rkd") and args.gt_weight == 0:   # the head needs a signal: the teacher's logits
        terms["kd"] = args.kd_weight * kd_loss(s, t, T=args.kd_T)
    return terms


def lr_at(args, epoch_float):
    """Per-step MAE schedule in epochs (fractional): linear warm-up, then half-cosine down to min_lr."""
    if epoch_float < args.warmup_epochs:
        return args.lr * epoch_float / args.warmup_epochs
    progress, min_lr = (epoch_float - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8), 1e-6
    return min_lr + (args.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_one_epoch(args, epoch, model, teacher, regressor, optimizer, train_set, num_classes, rank, world_size, device,
                    max_steps=None):
    """One epoch (its first max_steps steps if given) -> {lr (last step), loss, loss_<term>, train_beta_* (adaptconf),
    bad_images, images_per_s}: means over every step of every process, read from the device once, at the end."""
    # each process: an equal shard of one permutation; seeds for the workers' crops, for augment() on the device, for
    # mixup/cutmix, and for the global RNG: drop path and (with --workers 0) the crops
    perm = torch.randperm(len(train_set), generator=seeded("shuffle", args.seed, epoch))
    shard = perm[rank * (len(perm) // world_size):(rank + 1) * (len(perm) // world_size)].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, shard), batch_size=args.batch_size,
                                         drop_last=True, num_workers=args.workers, pin_memory=device.type == "cuda",
                                         generator=seeded("augment", args.seed, rank, epoch))
    torch.manual_seed(seeded("train", args.seed, rank, epoch).initial_seed())
    random.seed(torch.initial_seed())   # Python's too: RandomChoice of the crop's interpolation
    model.train()   # (the regressor is never switched to eval)
    mix_rng = random.Random(seeded("mix", args.seed, rank, epoch).initial_seed())
    augment_rng = seeded("augment on the device", args.seed, rank, epoch, device=device)
    sums, beta, bad = {}, torch.zeros(13, dtype=torch.float64, device=device), 0   # beta: summed beta_counts
    steps, start = max_steps or len(loader), time.time()
    progress = Progress(rank, steps, args.batch_size * world_size,
                        1 if max_steps else min(args.epochs, args.stop_after or args.epochs) - epoch)
    for step, (images, labels, *paths) in zip(range(steps), loader):   # paths: Checked's unreadable files
        bad += count_bad(args, *paths)
        lr = lr_at(args, epoch + step / len(loader))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images, targets = augment(images, labels, num_classes, augment_rng, mix_rng)   # one batch for both models
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            student_out = model(images, features=True)                        # (logits, pooled, token grid)
            with torch.no_grad():
                teacher_out = None if teacher is None else teacher_forward(teacher, images)
        if regressor is not None:   # fitnet, float32: token grid (B, D, H/16, W/16) -> the teacher's layer4 shape
            student_out = (*student_out[:2], regressor(student_out[2].float()))
        terms = loss_terms(args, epoch, student_out, teacher_out, targets.float())
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}.items():
            sums[name] = sums.get(name, 0) + value.detach().double()
        if args.loss == "adaptconf":   # Figure 3: β of the training batches
            beta += beta_counts(adaptconf_beta(student_out[0], teacher_out[0], tau=args.tau))
        progress.step(step + 1)
    totals = all_reduce_sum(torch.cat([torch.stack(list(sums.values())), beta, beta.new_tensor([bad, step + 1])])).cpu()
    means = dict(zip(sums, (totals[:len(sums)] / totals[-1]).tolist()))   # totals[-1]: steps of all processes
    check_finite(means, epoch)
    stats = {"lr": lr, **means, "bad_images": int(totals[-2])}
    if args.loss == "adaptconf":
        stats.update(beta_summary(totals[len(sums):-2], "train_beta"))
    return {**stats, "images_per_s": totals[-1].item() * args.batch_size / (time.time() - start)}


@torch.no_grad()
def evaluate(args, model, loader, device):
    """{top1, top5 (percent), images}: each process scores its shard (load_data), the correct counts and totals are
    summed over processes, so every image counts exactly once (and an unreadable one under --skip-bad-images not)."""
    model.eval()   # no drop path: score the deterministic model that is saved (train_one_epoch sets .train())
    counts = torch.zeros(3, dtype=torch.float64, device=device)             # top1, top5, total
    for images, labels, *paths in loader:
        if count_bad(args, *paths):   # label -1: Checked's stand-in for an unreadable image, never correct or counted
            labels = torch.where(torch.tensor([bool(path) for path in paths[0]]), -1, labels)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):   # no TF32: as on the CPU
            logits = model(images)   # float32, no autocast: bf16 logits tie or swap the top class for ~1% of images
        counts[:2] += topk_correct(logits.float(), labels, (1, 5)).to(counts)
        counts[2] += (labels >= 0).sum()
    top1, top5, total = all_reduce_sum(counts).tolist()
    return {"top1": 100.0 * top1 / max(total, 1), "top5": 100.0 * top5 / max(total, 1), "images": int(total)}


def main(args):
    rank, world_size, device = setup_distributed()
    try:
        say = print if rank == 0 else (lambda *a, **k: None)
        global_batch = args.batch_size * world_size
        args.lr = args.lr or args.blr * global_batch / 256   # before open_run: a resume compares the lr it trains with
        ckpt = None if args.benchmark or args.eval_only else open_run(args, rank)
        if (args.benchmark or args.eval_only) and args.out:   # they write benchmark.json or results.json, not a run
            if args.eval_only and os.path.exists(os.path.join(args.out, "results.json")) and not args.overwrite:
                raise UserError(f"--out {args.out} holds results.json; pass --overwrite to replace it or another --out")
            make_out(args.out)
        memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
        torch.backends.cudnn.benchmark = True   # fixed input shapes (drop_last): cuDNN picks its convolutions once
        train_set, val_loader, num_classes = load_data(args, rank, world_size, device)
        torch.manual_seed(args.seed)   # the same student initialisation for every loss
        raw_model = build_student(args, num_classes)
        if args.eval_only:
            load_weights(raw_model, load_state_dict(args.eval_only, "--eval-only"), f"--eval-only {args.eval_only}")
        elif args.pretrained:
            for line in load_mae_checkpoint(raw_model, args.pretrained):
                say(f"MAE checkpoint {args.pretrained}: {line}")
        else:
            say("no --pretrained: the ViT starts from random weights (Table 3 needs mae_pretrain_vit_base.pth)")
        raw_model.to(device, memory_format=memory_format)
        say(f"student {args.model}: {sum(p.numel() for p in raw_model.parameters()):,} parameters, {num_classes} "
            "classes")
        if args.eval_only:
            results = {**evaluate(args, raw_model, val_loader, device), "checkpoint": args.eval_only}
            say(f"eval: top1 {results['top1']:.2f}  top5 {results['top5']:.2f}  ({results['images']} images)")
            if args.out and rank == 0:
                write_text(json.dumps({**results, **run_info(world_size, device), "args": vars(args)}, indent=2),
                           os.path.join(args.out, "results.json"))
            return results

        teacher = regressor = None
        if args.loss != "ce":
            teacher = build_teacher(args, num_classes).to(device, memory_format=memory_format)
            say(f"teacher {args.teacher}: {args.teacher_ckpt or 'random weights (--benchmark)'}")
        if args.loss == "fitnet":   # student token grid (H/16) -> teacher last stage (H/32): 3x3 conv, stride 2
            with torch.no_grad():
                t_map = teacher_forward(teacher, torch.zeros(1, 3, args.image_size, args.image_size, device=device))[2]
            regressor = FeatureRegressor(raw_model.head.in_features, t_map.shape[1], raw_model.grid,
                                         t_map.shape[-1]).to(device)
        groups = param_groups_lrd(raw_model, weight_decay=0.05, layer_decay=0.65)   # MAE's ViT-B fine-tuning
        if regressor is not None:
            groups.append({"params": list(regressor.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=args.lr,
                                      fused=True)   # one kernel; no step count read back per tensor and step
        model = DDP(raw_model) if world_size > 1 else raw_model   # DDP averages gradients; raw_model is saved
        trained_regressor = DDP(regressor) if world_size > 1 and regressor is not None else regressor
        say(f"global batch {global_batch} ({world_size} x {args.batch_size}); lr {args.lr:.3g} "
            f"(blr {args.blr:g} x {global_batch}/256 unless --lr); layer decay 0.65; loss {args.loss}, "
            f"gt weight {args.gt_weight}")

        if args.benchmark:   # the ordinary loop on synthetic images: 5 warm-up steps, then STEPS timed steps
            for steps in (5, args.benchmark):
                start = time.time()   # train_one_epoch returns floats read from the device: its steps are done
                train_one_epoch(args, 0, model, teacher, trained_regressor, optimizer, train_set, num_classes, rank,
                                world_size, device, max_steps=steps)
            seconds, name = time.time() - start, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            result = {"images_per_s": steps * global_batch / seconds, "ms_per_step": 1000 * seconds / steps,
                      "global_batch": global_batch, "device": f"{world_size} x {name}", "loss": args.loss}
            say(f"benchmark: {result['images_per_s']:.4g} images/s, {result['ms_per_step']:.1f} ms/step (loss "
                f"{args.loss}, global batch {global_batch}, {result['device']})")
            if args.out and rank == 0:
                write_text(json.dumps(result, indent=2), os.path.join(args.out, "benchmark.json"))
            return result

        start_epoch, best, seconds_before, teacher_top1 = 0, {"top1": -1.0, "top5": -1.0, "epoch": -1}, 0.0, None
        ckpt_path = os.path.join(args.out, "checkpoint.pt") if args.out else None
        if ckpt is not None:   # open_run: --resume found a checkpoint in --out, made with the same arguments
            load_weights(raw_model, ckpt["model"], f"--resume {ckpt_path}")
            optimizer.load_state_dict(ckpt["optimizer"])
            if regressor is not None:
                regressor.load_state_dict(ckpt["regressor"])
            start_epoch, best, seconds_before, teacher_top1 = map(ckpt.get, "epoch best seconds teacher_top1".split())
        if teacher is not None and start_epoch == 0:   # how weak the teacher is on this validation set
            teacher_top1 = evaluate(args, teacher, val_loader, device)["top1"]
            say(f"teacher top1 {teacher_top1:.2f}")

        start, metrics = time.time(), None
        end_epoch = min(args.epochs, args.stop_after or args.epochs)
        for epoch in range(start_epoch, end_epoch):
            epoch_start = time.time()
            stats = train_one_epoch(args, epoch, model, teacher, trained_regressor, optimizer, train_set, num_classes,
                                    rank, world_size, device)
            broadcast_buffers(raw_model)
            metrics = evaluate(args, raw_model, val_loader, device)
            if metrics["top1"] > best["top1"]:
                best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch}
            record = {"epoch": epoch, **stats, **metrics, "seconds": time.time() - epoch_start}
            if teacher_top1 is not None and epoch == 0:
                record["teacher_top1"] = teacher_top1
            if rank == 0:
                log_record(args.out, record)
                if ckpt_path:
                    save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "regressor": None if regressor is None else regressor.state_dict(),
                                 "epoch": epoch + 1, "best": best, "args": vars(args), "teacher_top1": teacher_top1,
                                 "seconds": seconds_before + time.time() - start}, ckpt_path)
        if metrics is None:   # resumed a run that had already finished: report the weights as they are
            metrics = evaluate(args, raw_model, val_loader, device)
        results = {"top1": metrics["top1"], "top5": metrics["top5"], "best_top1": best["top1"],
                   "best_top5": best["top5"], "best_epoch": best["epoch"], "teacher_top1": teacher_top1,
                   "images": metrics["images"], "epochs_done": max(start_epoch, end_epoch),
                   "seconds": seconds_before + time.time() - start, **run_info(world_size, device),
                   "args": vars(args)}
        if args.out and rank == 0:
            write_text(json.dumps(results, indent=2), os.path.join(args.out, "results.json"))
        return results
    finally:
        cleanup_distributed()


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "inat2018", "inat2019"],
                   help="imagefolder: <data-dir>/{train,val}/<class>/*; inat20xx: torchvision's INaturalist layout "
                        "and the official train20xx.json, val20xx.json")
    g.add_argument("--data-dir", default="data/imagenet", help="dataset root")
    g.add_argument("--image-size", type=int, default=224, help="training and evaluation (centre-crop) image size")
    g.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per training process")
    g.add_argument("--skip-bad-images", action="store_true", help="replace an unreadable image by another one and "
                   "count it in the log (bad_images);\ndefault: the run stops, naming the file")
    g = p.add_argument_group("student")
    g.add_argument("--model", default="vit_base_patch16", choices=list(VIT_CONFIGS), help="student ViT")
    g.add_argument("--pretrained", default=None, help="MAE checkpoint (mae_pretrain_vit_base.pth); None = random init")
    g.add_argument("--global-pool", action="store_true", help="classify from mean patch token + fc_norm (MAE default) "
                                                              "instead of the class token (official code)")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    g = p.add_argument_group("optimisation", "MAE fine-tuning (paper appendix, official config): AdamW,\nlayer-wise "
                             "lr decay 0.65, weight decay 0.05 (none on norms, biases, tokens), cosine to 1e-6,\n"
                             "RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 or cutmix 1.0")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=int, default=128, help="batch size PER PROCESS (8 x 128 = 1024 official)")
    g.add_argument("--blr", type=float, default=5e-4, help="base lr: AdamW lr = blr x global_batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    g.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up, set every step")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the ground-truth term")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (CPU runs float32)")
    g = p.add_argument_group("teacher and loss")
    g.add_argument("--teacher", default="resnet50", choices=list(TEACHERS), help="torchvision ResNet teacher")
    g.add_argument("--teacher-ckpt", default=None, help="teacher checkpoint (torchvision/timm ResNet keys; on "
                   "iNaturalist class k = category_id k); needed by every loss but ce, except under --benchmark")
    g.add_argument("--loss", default="adaptconf", choices=["ce", "kd", "fitnet", "rkd", "dkd", "augconf", "adaptconf"],
                   help="ce = student baseline without teacher")
    g.add_argument("--gt-weight", type=float, default=1.0, help="weight of the ground-truth CE; 0 = teacher only")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the kd/augconf/adaptconf term")
    g.add_argument("--kd-T", type=float, default=1.0, help="KD temperature (kd, augconf, adaptconf)")
    g.add_argument("--tau", type=float, default=4.0, help="adaptconf beta temperature (4.0 for MAE ViT-B)")
    g.add_argument("--alpha-max", type=float, default=0.5, help="augconf: final alpha (ramp over 30%% of epochs)")
    g.add_argument("--fitnet-weight", type=float, default=1.0, help="fitnet hint weight")
    g.add_argument("--dkd-alpha", type=float, default=1.0, help="DKD TCKD weight (official code 1)")
    g.add_argument("--dkd-beta", type=float, default=2.0, help="DKD NCKD weight (official code 2)")
    g.add_argument("--dkd-T", type=float, default=1.0, help="DKD temperature (official code 1)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output directory (None: write nothing)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (a fresh run if none)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out")
    g.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (of the full schedule)")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate the student weights at CKPT and stop")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                   help="time STEPS steps of the training loop on synthetic images of the real size, augmented as\n"
                        "real ones (no data; without --teacher-ckpt the teacher keeps random weights); prints\n"
                        "images/s, ms/step")
    args = p.parse_args(argv)
    check_numbers(p, args)
    if args.loss in ("ce", "dkd") and args.gt_weight <= 0:
        p.error(f"--loss {args.loss} needs ground-truth labels (ce learns from them alone, dkd takes its target class "
                "from them; the paper has no teacher-only DKD): --gt-weight must be > 0")
    if args.loss != "ce" and not (args.teacher_ckpt or args.benchmark or args.eval_only):
        p.error(f"--loss {args.loss} needs a teacher: pass --teacher-ckpt PATH")
    if args.image_size % VIT_CONFIGS[args.model]["patch_size"]:
        p.error(f"--image-size {args.image_size} is not a multiple of the patch size of {args.model}")
    if sum(map(bool, (args.benchmark, args.eval_only, args.resume))) > 1:
        p.error("--benchmark, --eval-only and --resume cannot be combined: pass one of them")
    return args


if __name__ == "__main__":
    main(parse_args())
