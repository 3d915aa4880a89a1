"""transfer.py (Table 3): MAE checkpoint loading, layer-wise lr decay, mixup shared with the teacher, every loss
through the training loop, end-to-end distillation, exact resume, a real 2-process torchrun, the benchmark on
synthetic data and the errors people will hit. CPU only, tiny ViT (vit_tiny_test: patch 8, dim 32, depth 2)."""
import functools
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2

import common
import transfer
from conftest import make_image_tree, run_torchrun, syncs_per_step

TINY = transfer.VIT_CONFIGS["vit_tiny_test"]   # patch 8, dim 32, depth 2, heads 2, mlp 64
NUM_CLASSES = 3


def mae_state_dict(grid, dim=TINY["dim"], depth=TINY["depth"], mlp=TINY["mlp_dim"], patch=TINY["patch_size"], seed=0):
    """A synthetic MAE pre-training checkpoint, written key by key with MAE's names (encoder + decoder, no head)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2   # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim),
          "mask_token": r(1, 1, 16), "decoder_embed.weight": r(16, dim), "decoder_pred.bias": r(patch * patch * 3)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                   b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                   b + "mlp.fc1.weight": r(mlp, dim), b + "mlp.fc1.bias": r(mlp),
                   b + "mlp.fc2.weight": r(dim, mlp), b + "mlp.fc2.bias": r(dim)})
    return sd


def reference_forward(sd, x, head_w, head_b, heads=TINY["heads"], global_pool=False):
    """The ViT written out with plain tensor ops from the checkpoint tensors, independent of transfer.py's modules."""
    patch = sd["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([sd["cls_token"].expand(len(x), -1, -1), tokens], 1) + sd["pos_embed"]
    dim = tokens.shape[-1]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = lambda n: sd[f"blocks.{i}.{n}"]   # noqa: E731
        h = F.layer_norm(tokens, (dim,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        q, k, v = (h @ b("attn.qkv.weight").T + b("attn.qkv.bias")).chunk(3, dim=-1)
        split = lambda t: t.reshape(len(x), -1, heads, dim // heads).transpose(1, 2)   # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
        mixed = (att @ split(v)).transpose(1, 2).reshape(len(x), -1, dim)
        tokens = tokens + mixed @ b("attn.proj.weight").T + b("attn.proj.bias")
        h = F.layer_norm(tokens, (dim,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        tokens = tokens + h
        i += 1
    if global_pool:   # fc_norm is new: weight 1, bias 0
        pooled = F.layer_norm(tokens[:, 1:].mean(1), (dim,), eps=1e-6)
    else:
        pooled = F.layer_norm(tokens, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]
    return pooled @ head_w.T + head_b


def tiny_vit(global_pool=False, size=32, classes=NUM_CLASSES):
    return transfer.VisionTransformer(classes, img_size=size, drop_path=0.1, global_pool=global_pool, **TINY)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An image tree (18 training, 9 validation images), a tiny MAE checkpoint and a resnet18 teacher checkpoint."""
    root = tmp_path_factory.mktemp("transfer")
    data = str(root / "data")
    make_image_tree(data, splits=("train",), num_classes=NUM_CLASSES, per_class=6, size=32, seed=0)
    make_image_tree(data, splits=("val",), num_classes=NUM_CLASSES, per_class=3, size=32, seed=1)
    mae = str(root / "mae_tiny.pth")
    torch.save({"model": mae_state_dict(grid=4)}, mae)
    teacher = str(root / "teacher_r18.pth")
    torch.manual_seed(0)
    torch.save({"model": torchvision.models.resnet18(num_classes=NUM_CLASSES).state_dict(), "epoch": 1}, teacher)
    return {"data": data, "mae": mae, "teacher": teacher, "root": root}


def cli(files, out, *extra):
    return ["--data-dir", files["data"], "--model", "vit_tiny_test", "--image-size", "32", "--batch-size", "4",
            "--workers", "0", "--epochs", "2", "--warmup-epochs", "1", "--teacher", "resnet18",
            "--teacher-ckpt", files["teacher"], "--pretrained", files["mae"], "--out", str(out), *extra]


# ---- the student and its MAE checkpoint ---------------------------------------------------------------------------

@pytest.mark.parametrize("global_pool", [False, True])
def test_mae_checkpoint_loads_every_encoder_tensor_and_reproduces_outputs(files, global_pool):
    sd = mae_state_dict(grid=4)
    model = tiny_vit(global_pool)
    report = " | ".join(transfer.load_mae_checkpoint(model, files["mae"]))
    new = "fc_norm.bias, fc_norm.weight, head.bias, head.weight" if global_pool else "head.bias, head.weight"
    assert f"loaded {len(sd) - 3 - 2 * global_pool} encoder tensors; new: {new}" in report
    assert "unused MAE decoder tensors: 3" in report
    assert ("unused from the checkpoint: norm.bias, norm.weight" in report) == global_pool   # as MAE's fine-tuning
    own = model.state_dict()
    for name, tensor in sd.items():   # every encoder tensor landed where its name says
        if name in own:
            assert torch.equal(own[name], tensor), name
    assert model.head.weight.abs().max() < 1e-4   # MAE's near-zero new head
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference_forward(sd, x, model.head.weight, model.head.bias, global_pool=global_pool)
        assert torch.allclose(model(x), expected, atol=1e-5)
        # bigger head weights so that the comparison is not dominated by the near-zero head
        model.head.weight.normal_()
        expected = reference_forward(sd, x, model.head.weight, model.head.bias, global_pool=global_pool)
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=1e-4)


def test_position_embedding_is_interpolated_for_another_image_size(tmp_path):
    sd = mae_state_dict(grid=2)                       # pre-trained at 16 px, fine-tuned at 32 px
    sd["pos_embed"][:, 1:] = 0.7                      # a constant grid stays constant under bicubic resizing
    path = str(tmp_path / "mae16.pth")
    torch.save({"model": sd}, path)
    model = tiny_vit()
    report = transfer.load_mae_checkpoint(model, path)
    assert "pos_embed interpolated from 2x2 to 4x4 patches" in report
    assert model.pos_embed.shape == (1, 17, TINY["dim"])
    assert torch.equal(model.pos_embed[:, :1], sd["pos_embed"][:, :1])   # the class token's embedding is kept
    assert torch.allclose(model.pos_embed[:, 1:], torch.full((1, 16, TINY["dim"]), 0.7), atol=1e-5)


def test_checkpoints_that_are_not_this_mae_vit_are_refused(tmp_path):
    resnet = str(tmp_path / "resnet.pth")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), resnet)
    with pytest.raises(transfer.UserError, match="--pretrained .*resnet.pth is not an MAE ViT checkpoint"):
        transfer.load_mae_checkpoint(tiny_vit(), resnet)
    wide = str(tmp_path / "wide.pth")
    torch.save({"model": mae_state_dict(grid=4, dim=48)}, wide)
    with pytest.raises(transfer.UserError, match="--pretrained .*wide.pth: .*different ViT size"):
        transfer.load_mae_checkpoint(tiny_vit(), wide)
    shallow = str(tmp_path / "shallow.pth")
    torch.save({"model": mae_state_dict(grid=4, depth=1)}, shallow)
    with pytest.raises(transfer.UserError, match="--pretrained .*shallow.pth lacks .* encoder tensors .*blocks.1"):
        transfer.load_mae_checkpoint(tiny_vit(), shallow)


def test_vit_b16_matches_torchvision_tensor_for_tensor():
    """ViT-B/16: 86,567,656 parameters, 152 tensors mapping one to one onto torchvision's vit_b_16."""
    with torch.device("meta"):   # shapes only: no memory, no initialisation time
        ours = transfer.build_student(transfer.parse_args(["--loss", "ce"]), 1000).state_dict()
        theirs = torchvision.models.vit_b_16().state_dict()
    assert sum(t.numel() for t in ours.values()) == 86_567_656 == sum(t.numel() for t in theirs.values())
    assert len(ours) == len(theirs) == 152
    fixed = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "norm.weight": "encoder.ln.weight",
             "norm.bias": "encoder.ln.bias", "head.weight": "heads.head.weight", "head.bias": "heads.head.bias",
             "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias"}
    inner = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
             "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
             "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    for name, tensor in ours.items():
        if name in fixed:
            mapped = fixed[name]
        else:
            _, i, rest = name.split(".", 2)
            key = next(k for k in inner if rest.startswith(k))
            mapped = f"encoder.layers.encoder_layer_{i}." + rest.replace(key, inner[key], 1)
        assert theirs[mapped].shape == tensor.shape, (name, mapped)


def test_drop_path_grows_linearly_and_only_acts_in_training():
    model = transfer.VisionTransformer(3, img_size=32, drop_path=0.3, patch_size=8, dim=32, depth=4, heads=2,
                                       mlp_dim=64)
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.ones(4000, 8)
    torch.manual_seed(0)
    dropped = transfer.drop_path(x, 0.25, training=True)
    assert dropped.unique().tolist() == pytest.approx([0.0, 4 / 3])      # dropped, or kept and rescaled by 1/(1-p)
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))       # per sample, never per element
    assert (dropped[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(transfer.drop_path(x, 0.25, training=False), x)


def test_evaluate_scores_the_deterministic_model():
    """evaluate() must switch drop path off: the same weights scored twice give identical counts, equal to an
    eval-mode forward."""
    model = transfer.VisionTransformer(3, img_size=32, drop_path=0.5, patch_size=8, dim=32, depth=4, heads=2,
                                       mlp_dim=64).train()
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, 32, 32), torch.randint(0, 3, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    args = transfer.parse_args(["--loss", "ce"])
    first = transfer.evaluate(args, model, loader, torch.device("cpu"))
    model.train()
    assert transfer.evaluate(args, model, loader, torch.device("cpu")) == first
    with torch.no_grad():
        expected = 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()
    assert first["top1"] == pytest.approx(expected) and first["images"] == 40


# ---- recipe: layer-wise lr decay, weight decay, schedule -------------------------------------------------------------

def test_layer_decay_groups_carry_the_right_lr_scale_and_weight_decay():
    model = tiny_vit()
    groups = transfer.param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65)
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())   # every parameter exactly once
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    depth = TINY["depth"]
    for name, p in model.named_parameters():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            want = 0.65 ** (depth + 1)
        elif name.startswith("blocks."):
            want = 0.65 ** (depth - int(name.split(".")[1]))
        else:
            assert name.startswith(("norm.", "head."))
            want = 1.0
        assert scale[name] == pytest.approx(want), name
        assert decay[name] == (0.0 if p.ndim == 1 or name in ("cls_token", "pos_embed") else 0.05), name
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** 2) and decay["blocks.0.mlp.fc1.bias"] == 0.0


def test_lr_schedule_warms_up_per_step_then_cosine_to_min_lr():
    args = transfer.parse_args(["--loss", "ce", "--lr", "2e-3", "--epochs", "100", "--warmup-epochs", "5"])
    assert transfer.lr_at(args, 0.0) == 0.0
    assert transfer.lr_at(args, 2.5) == pytest.approx(1e-3)                # per step, not per epoch
    assert transfer.lr_at(args, 5.0) == pytest.approx(2e-3)
    assert transfer.lr_at(args, 52.5) == pytest.approx(1e-6 + (2e-3 - 1e-6) / 2)
    assert transfer.lr_at(args, 100.0) == pytest.approx(1e-6)


# ---- mixup / cutmix shared with the teacher, and every loss ---------------------------------------------------------

def step_setup(loss, gt_weight=1.0):
    """Args, a tiny student, a resnet18 teacher (None for ce) and the FitNet regressor (None but for fitnet)."""
    args = transfer.parse_args(["--model", "vit_tiny_test", "--image-size", "32", "--loss", loss, "--teacher",
                                "resnet18", "--teacher-ckpt", "unused.pth", "--gt-weight", str(gt_weight), "--epochs",
                                "10", "--lr", "1e-3", "--batch-size", "6", "--workers", "0"])
    torch.manual_seed(0)
    student = tiny_vit()
    teacher = None
    if loss != "ce":
        teacher = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval().requires_grad_(False)
    regressor = transfer.FeatureRegressor(TINY["dim"], 512, student.grid, 1) if loss == "fitnet" else None
    return args, student, teacher, regressor


def uint8_images(n, size=32):   # crops as the workers deliver them
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def train_steps(args, student, teacher, regressor, images, labels, epoch=2):
    """train_one_epoch over (images, labels) in batches of --batch-size; returns its stats."""
    groups = transfer.param_groups_lrd(student, 0.05, 0.65)
    if regressor is not None:
        groups.append({"params": list(regressor.parameters()), "weight_decay": 0.0, "lr_scale": 1.0})
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=args.lr)
    data = torch.utils.data.TensorDataset(images, labels)
    return transfer.train_one_epoch(args, epoch, student, teacher, regressor, optimizer, data, NUM_CLASSES, 0, 1,
                                    torch.device("cpu"))


def test_mixed_targets_sum_to_one_and_the_teacher_sees_the_same_mixed_batch(monkeypatch):
    args, student, teacher, regressor = step_setup("kd")
    images, labels = uint8_images(24), torch.arange(24) % NUM_CLASSES   # 4 batches of 6
    seen = {"student": [], "teacher": [], "targets": []}
    student.patch_embed.proj.register_forward_pre_hook(lambda m, inp: seen["student"].append(inp[0].clone()))
    teacher.conv1.register_forward_pre_hook(lambda m, inp: seen["teacher"].append(inp[0].clone()))
    loss_terms = transfer.loss_terms

    def recording_loss_terms(args, epoch, student_out, teacher_out, labels):
        seen["targets"].append(labels)
        return loss_terms(args, epoch, student_out, teacher_out, labels)
    monkeypatch.setattr(transfer, "loss_terms", recording_loss_terms)
    train_steps(args, student, teacher, regressor, images, labels)
    assert len(seen["student"]) == len(seen["teacher"]) == len(seen["targets"]) == 4
    for x, x_teacher, targets in zip(seen["student"], seen["teacher"], seen["targets"]):
        assert torch.equal(x, x_teacher)                                       # one augmented, mixed batch for both
        assert targets.shape == (6, NUM_CLASSES) and torch.allclose(targets.sum(1), torch.ones(6))
    assert all((t.max(dim=1).values < 1).any() for t in seen["targets"])   # soft, mixed targets


@pytest.mark.parametrize("loss,gt_weight", [("ce", 1), ("kd", 1), ("kd", 0), ("fitnet", 1), ("fitnet", 0),
                                            ("rkd", 1), ("rkd", 0), ("dkd", 1), ("augconf", 1), ("augconf", 0),
                                            ("adaptconf", 1), ("adaptconf", 0)])
def test_every_loss_trains_with_finite_terms_and_gradients(loss, gt_weight):
    args, student, teacher, regressor = step_setup(loss, gt_weight)
    stats = train_steps(args, student, teacher, regressor, uint8_images(6), torch.tensor([0, 1, 2] * 2))
    terms = {k.removeprefix("loss_") for k in stats if k.startswith("loss_")}
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert ("gt" in terms) == (gt_weight > 0)
    assert ("kd" in terms) == (loss == "kd" or (loss in ("fitnet", "rkd") and gt_weight == 0))
    assert terms - {"gt", "kd"} == ({loss} - {"ce", "kd"})
    assert stats["loss"] == pytest.approx(sum(stats[f"loss_{t}"] for t in terms), rel=1e-5)
    assert stats["lr"] == pytest.approx(1e-3 * 2 / 5)                      # epoch 2 of the 5 warm-up epochs
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if loss == "fitnet":
        assert regressor.conv.weight.grad.abs().sum() > 0
    assert ("train_beta_mean" in stats) == (loss == "adaptconf")
    if loss == "adaptconf":   # β ∈ (0, 0.5] of Eq. 2, a 10-bin histogram of fractions
        assert 0 < stats["train_beta_mean"] <= 0.5 and len(stats["train_beta_hist"]) == 10
        assert sum(stats["train_beta_hist"]) == pytest.approx(1.0)


def test_training_augmentation_is_timms_with_randaugment_per_image_on_the_device():
    """Workers: timm's random-resized crop (bilinear or bicubic at random, scale 0.08-1) and flip -> uint8 crops.
    augment() on the device: common.rand_augment with timm's rand-m9-mstd0.5-inc1 parameters and ImageNet's mean
    colour as fill, each image its own draws; ImageNet normalisation; mixup/cutmix; random erasing. Checked against
    the same steps done one by one (normalisation in float64) from the same generator."""
    train, _ = transfer.build_transforms(transfer.parse_args(["--loss", "ce", "--image-size", "32"]))
    assert [type(t).__name__ for t in train.transforms] == ["RandomChoice", "RandomHorizontalFlip", "PILToTensor"]
    modes = torchvision.transforms.InterpolationMode
    crops = train.transforms[0].transforms
    assert [c.interpolation for c in crops] == [modes.BILINEAR, modes.BICUBIC]
    assert all(c.size == (32, 32) and c.scale == (0.08, 1.0) and c.ratio == pytest.approx((3 / 4, 4 / 3))
               for c in crops)
    torch.manual_seed(0), random.seed(0)   # the crop's own draws: reproducible
    crop = train(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)))
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
    images, labels = crop.expand(6, -1, -1, -1), torch.tensor([0, 1, 2] * 2)   # one crop six times
    got, targets = transfer.augment(images, labels, NUM_CLASSES, torch.Generator().manual_seed(1), FixedDraws(0.2))
    generator = torch.Generator().manual_seed(1)
    augmented = common.rand_augment(images, generator, magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5,
                                    fill=(124, 116, 104))
    assert sum(not torch.equal(a, augmented[0]) for a in augmented[1:]) >= 3   # each image its own ops
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = (augmented.double() / 255 - mean.double()) / std.double()
    x = 0.3 * x + 0.7 * x.roll(1, 0)                                           # mixup, λ = 0.3 (FixedDraws)
    want = transfer.random_erase(x.float(), generator)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    one_hot = F.one_hot(labels, NUM_CLASSES).float()
    assert torch.allclose(targets, 0.3 * one_hot + 0.7 * one_hot.roll(1, 0))


def test_random_erasing_is_timms_pixel_mode_image_by_image():
    """random_erase against timm's RandomErasing(0.25, mode="pixel") written as its per-image loop over the same
    uniform draws, and in distribution: a quarter of the images, boxes of 2%-1/3 of the area, N(0, 1) noise."""
    B, H, W = 400, 24, 16
    images = torch.full((B, 3, H, W), 7.0)
    got = transfer.random_erase(images, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    u_area, u_aspect, u_p, u_top, u_left = (torch.rand(shape, generator=g, dtype=torch.float64).tolist()
                                            for shape in ((B, 10), (B, 10), (B,), (B,), (B,)))
    noise = torch.randn(images.shape, generator=g)
    want = images.clone()
    for i in range(B):
        if u_p[i] >= 0.25:
            continue
        for a in range(10):
            area = H * W * (0.02 + (1 / 3 - 0.02) * u_area[i][a])
            aspect = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * u_aspect[i][a])
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < H and w < W:
                top, left = int(u_top[i] * (H - h + 1)), int(u_left[i] * (W - w + 1))
                want[i, :, top:top + h, left:left + w] = noise[i, :, top:top + h, left:left + w]
                break
    assert torch.equal(got, want)
    erased = (got != 7.0).any(1).double()                                   # (B, H, W)
    fraction = erased.flatten(1).mean(1)
    assert 0.19 < (fraction > 0).double().mean() < 0.31
    assert fraction[fraction > 0].min() >= 0.015 and fraction.max() <= 0.36
    values = got[got != 7.0]
    assert abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05


def test_evaluation_is_timms_bicubic_resize_and_centre_crop_with_imagenet_normalisation():
    """ViT-B's timm config: crop_pct 0.9, bicubic (224: resize the short side to 248, centre crop 224); here 40 px:
    short side floor(40 / 0.9) = 44. Checked against PIL and numpy in float64."""
    _, val = transfer.build_transforms(transfer.parse_args(["--loss", "ce", "--model", "vit_tiny_test", "--image-size", "40"]))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))   # H 60, W 90 -> 44 x 66
    resized = np.asarray(image.resize((66, 44), Image.BICUBIC), dtype=np.float64) / 255
    crop = resized[2:42, 13:53]   # centred: (44 - 40) / 2 rows, (66 - 40) / 2 columns
    want = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    got = val(image)
    assert got.shape == (3, 40, 40)
    assert np.allclose(got.permute(1, 2, 0).double().numpy(), want, atol=1e-5)


class FixedDraws:   # stands in for random.Random: mixup (u < 0.5) or cutmix, λ = 0.3, box centre (10, 10)
    def __init__(self, u):
        self.u, self.alphas = u, []

    def random(self):
        return self.u

    def betavariate(self, a, b):
        self.alphas.append((a, b))
        return 0.3

    def randrange(self, n):
        return 10


@pytest.mark.parametrize("u,name,alpha", [(0.2, "MixUp", 0.8), (0.7, "CutMix", 1.0)])
def test_mix_is_torchvisions_mixup_or_cutmix_with_maes_alphas(u, name, alpha, monkeypatch):
    """transfer.mix draws from a Python RNG (no tensor read back on the GPU) and then mixes exactly as torchvision's
    v2.MixUp / v2.CutMix with the same λ and box centre, bit for bit."""
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2] * 2)
    draws = FixedDraws(u)
    mixed, target = transfer.mix(images, labels, NUM_CLASSES, draws)
    assert draws.alphas == [(alpha, alpha)]
    reference = getattr(v2, name)(alpha=alpha, num_classes=NUM_CLASSES)
    monkeypatch.setattr(reference._dist, "sample", lambda shape: torch.tensor(0.3))
    monkeypatch.setattr(torch, "randint", lambda high, size: torch.tensor([10]))
    want_images, want_target = reference(images, labels)
    assert torch.equal(mixed, want_images) and torch.equal(target, want_target)
    assert not torch.equal(mixed, images) and torch.allclose(target.sum(1), torch.ones(6))


def test_loss_terms_choose_the_loss_without_running_a_model():
    args = transfer.parse_args(["--loss", "dkd", "--teacher-ckpt", "unused.pth", "--dkd-T", "2"])
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    labels = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    terms = transfer.loss_terms(args, 0, (s, None, None), (t, None, None), labels)
    assert set(terms) == {"gt", "dkd"}
    assert terms["gt"].item() == pytest.approx(F.cross_entropy(s, labels, label_smoothing=0.1).item())
    expected = common.dkd_loss(s, t, torch.tensor([0, 1, 2, 0]), alpha=1.0, beta=2.0, T=2.0)   # --dkd-T, not --kd-T
    assert terms["dkd"].item() == pytest.approx(expected.item())
    ce = transfer.parse_args(["--loss", "ce"])
    assert set(transfer.loss_terms(ce, 0, (s, None, None), None, labels)) == {"gt"}


# ---- end to end ----------------------------------------------------------------------------------------------------

def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_distillation_logs_checkpoints_and_eval_only(files, tmp_path):
    out = tmp_path / "run"
    results = transfer.main(transfer.parse_args(cli(files, out, "--loss", "adaptconf", "--epochs", "1",
                                                    "--warmup-epochs", "0")))
    (record,) = read_log(out)
    for key in ("epoch", "lr", "loss", "loss_gt", "loss_adaptconf", "top1", "top5", "images", "images_per_s",
                "seconds", "train_beta_mean", "train_beta_frac_half", "train_beta_hist", "teacher_top1", "bad_images"):
        assert key in record, key
    assert record["images"] == 9 and len(record["train_beta_hist"]) == 10 and record["bad_images"] == 0
    assert sum(record["train_beta_hist"]) == pytest.approx(1.0) and 0 < record["train_beta_mean"] <= 0.5
    assert round(record["top1"] * 9 / 100, 6) == round(record["top1"] * 9 / 100)   # counts, not averaged means
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved["top1"] == results["top1"] == record["top1"] and saved["args"]["loss"] == "adaptconf"
    assert saved["teacher_top1"] == record["teacher_top1"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)   # tensors and plain data only
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "args", "best"} <= set(ckpt)
    assert "head.weight" in ckpt["model"] and "cls_token" in ckpt["model"]
    groups = ckpt["optimizer"]["param_groups"]   # MAE's layer decay 0.65 and weight decay 0.05 reach the optimizer
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx(sorted(0.65 ** k for k in range(TINY["depth"] + 2)))
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    evaluated = transfer.main(transfer.parse_args(cli(files, tmp_path / "eval", "--eval-only",
                                                      str(out / "checkpoint.pt"))))
    assert evaluated["top1"] == results["top1"] and evaluated["images"] == 9
    # --eval-only writes only results.json: into the run's own --out it needs --overwrite, which replaces only that file
    evaluate_in_run = cli(files, out, "--eval-only", str(out / "checkpoint.pt"))
    with pytest.raises(transfer.UserError, match="--out .*run holds results.json; pass --overwrite"):
        transfer.main(transfer.parse_args(evaluate_in_run))
    transfer.main(transfer.parse_args([*evaluate_in_run, "--overwrite"]))
    with open(out / "results.json") as f:
        assert json.load(f)["checkpoint"] == str(out / "checkpoint.pt")
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl", "results.json"]
    # --eval-only trains nothing: a batch larger than the training set (18 images) is no error
    big = transfer.main(transfer.parse_args(cli(files, tmp_path / "eval64", "--eval-only", str(out / "checkpoint.pt"),
                                                "--batch-size", "64")))
    assert big["images"] == 9


def test_resume_reproduces_an_uninterrupted_run_exactly(files, tmp_path, capsys):
    """fitnet: the regressor and its optimizer state must come back too. The split run is killed after its first
    checkpoint as it could be: a log line of the next epoch written, a cut-off line, a half-written checkpoint."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ("--loss", "fitnet", "--gt-weight", "0", "--resume")   # --resume on an empty or new --out: a fresh run
    split.mkdir()
    transfer.main(transfer.parse_args(cli(files, whole, *args)))
    transfer.main(transfer.parse_args(cli(files, split, *args, "--stop-after", "1")))
    assert "a fresh run (--resume found no checkpoint)" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(split)] == [0]
    with open(split / "log.jsonl", "a") as f:
        f.write(json.dumps({**read_log(split)[0], "epoch": 1}) + '\n{"epoch": 1, "lr": 0.0')
    (split / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    transfer.main(transfer.parse_args(cli(files, split, *args)))
    assert "resuming " in capsys.readouterr().out
    assert sorted(os.listdir(split)) == ["checkpoint.pt", "log.jsonl", "results.json"]
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["regressor"]:
        assert torch.equal(a["regressor"][name], b["regressor"][name]), name
    regressor_params = [k for k in a["regressor"] if not k.startswith("bn.running") and "num_batches" not in k]
    assert len(a["optimizer"]["state"]) == len(a["model"]) + len(regressor_params) == len(b["optimizer"]["state"])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rs]  # noqa
    assert strip(read_log(whole)) == strip(read_log(split))
    with open(whole / "results.json") as f, open(split / "results.json") as g:
        assert json.load(f)["top1"] == json.load(g)["top1"]


def test_torchrun_two_processes_count_every_validation_image_once(files, tmp_path):
    out = tmp_path / "ddp"
    proc = run_torchrun("transfer.py", cli(files, out, "--loss", "fitnet", "--gt-weight", "0", "--epochs", "1",
                                           "--warmup-epochs", "0", "--batch-size", "3"))   # fitnet: a DDP regressor
    assert "global batch 6 (2 x 3)" in proc.stdout
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["images"] == 9 and results["world_size"] == 2   # 5 + 4 on the two processes, no padding
    assert round(results["top1"] * 9 / 100, 6) == round(results["top1"] * 9 / 100)
    (record,) = read_log(out)
    assert "loss_gt" not in record and record["loss_kd"] > 0 and record["loss_fitnet"] > 0


def test_benchmark_runs_the_training_loop_on_synthetic_images_without_data(tmp_path, capsys):
    """No data and no teacher checkpoint: synthetic images of the real size, a teacher with random weights. It writes
    only benchmark.json, replacing an earlier one (no open_run: --out needs no --overwrite)."""
    (tmp_path / "benchmark.json").write_text("{}")
    args = transfer.parse_args(["--model", "vit_tiny_test", "--image-size", "32", "--batch-size", "4", "--workers", "0",
                                "--loss", "adaptconf", "--teacher", "resnet18", "--benchmark", "2", "--data-dir",
                                "/nonexistent", "--out", str(tmp_path)])
    result = transfer.main(args)
    assert result["images_per_s"] > 0 and result["ms_per_step"] > 0 and result["global_batch"] == 4
    with open(tmp_path / "benchmark.json") as f:
        assert json.load(f)["images_per_s"] == result["images_per_s"]
    out = capsys.readouterr().out
    assert "random weights" in out and "images/s" in out and "ms/step" in out
    assert not os.path.exists(tmp_path / "log.jsonl")   # the benchmark trains no epoch and writes no log


def test_logits_that_feed_beta_are_float32_under_autocast():
    """The ViT head and the teacher's fc run in float32 under bf16 autocast: bf16 logits tie in the top class and
    inflate the fraction of β = 0.5 (Eq. 2)."""
    student, teacher = tiny_vit(), torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert student.blocks[0].mlp(torch.randn(2, TINY["dim"])).dtype == torch.bfloat16   # autocast is on
        assert student(x).dtype == transfer.teacher_forward(teacher, x)[0].dtype == torch.float32


@pytest.mark.parametrize("loss", ["ce", "kd", "fitnet", "rkd", "dkd", "augconf", "adaptconf"])
def test_training_steps_read_nothing_back_from_the_device(loss):
    """No host sync per training step. On the CPU nothing waits, so torch.cuda.set_sync_debug_mode has nothing to
    report: conftest counts the reads that would wait on CUDA instead. --workers 1: batches are made in a worker
    process, on host tensors, as on a GPU machine."""
    run = lambda steps: transfer.main(transfer.parse_args([   # noqa: E731
        "--model", "vit_tiny_test", "--image-size", "32", "--batch-size", "4", "--workers", "1", "--loss", loss,
        "--teacher", "resnet18", "--benchmark", str(steps)]))
    assert syncs_per_step(run) == {}


@pytest.mark.parametrize("version", ["2018", "2019"])
def test_inaturalist_split_follows_the_official_json_files(tmp_path, version):
    """torchvision's INaturalist layout (<root>/<version>/<super>/<id>/file; train_val<version>/ renamed) split by the
    official train<version>.json / val<version>.json (images, annotations, categories): every image of a split is
    read, with the annotation's category_id as its label (Table 3b: 2018)."""
    root = tmp_path / "inat"
    meta = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    categories = [(0, "Plantae"), (1, "Plantae"), (2, "Aves")]   # ids are not in sorted super-category order
    for cat, sup in categories:
        folder = root / version / sup / str(cat)
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (80 * cat, 0, 0)).save(folder / f"{i}.jpg")
            split, image_id = meta["val" if i == 2 else "train"], 10 * cat + i
            split["images"].append({"id": image_id, "file_name": f"train_val{version}/{sup}/{cat}/{i}.jpg",
                                    "width": 20, "height": 20})
            split["annotations"].append({"id": image_id, "image_id": image_id, "category_id": cat})
    for split, content in meta.items():
        with open(root / f"{split}{version}.json", "w") as f:
            json.dump({**content, "categories": [{"id": c, "name": f"species {c}", "supercategory": s}
                                                 for c, s in categories]}, f)
    args = transfer.parse_args([f"--dataset=inat{version}", "--data-dir", str(root), "--image-size", "16",
                                "--loss", "ce"])
    train, val, num_classes = transfer.build_datasets(args)
    assert (len(train), len(val), num_classes) == (6, 3, 3)
    for split, subset in (("train", train), ("val", val)):
        want = {(img["file_name"].split("/", 1)[1], ann["category_id"])
                for img, ann in zip(meta[split]["images"], meta[split]["annotations"])}
        ds = subset.dataset
        got = {(os.path.join(ds.all_categories[ds.index[i][0]], ds.index[i][1]), subset[k][1])
               for k, i in enumerate(subset.indices)}
        assert got == want
    for image, label in val:   # the label is the class of the pixels too (red = 80 x category_id)
        assert image[0].mean().item() * 0.229 + 0.485 == pytest.approx(80 * label / 255, abs=0.02)
    os.remove(root / f"val{version}.json")
    with pytest.raises(transfer.UserError, match=f"val{version}.json is missing"):
        transfer.build_datasets(args)


# ---- errors are for people -----------------------------------------------------------------------------------------

def test_bad_inputs_stop_with_one_clear_sentence(files, tmp_path):
    run = lambda *extra: transfer.main(transfer.parse_args(cli(files, tmp_path / "bad", *extra)))  # noqa: E731
    with pytest.raises(transfer.UserError, match="--data-dir .*nowhere does not exist"):
        run("--data-dir", str(tmp_path / "nowhere"))
    (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "noval" / "train" / "a" / "0.jpg")
    with pytest.raises(transfer.UserError, match="--data-dir .*noval: .*No such file .*noval/val'; an image-folder"):
        run("--data-dir", str(tmp_path / "noval"))
    five = str(tmp_path / "r18_5.pth")
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), five)
    with pytest.raises(transfer.UserError, match="--teacher-ckpt .*r18_5.pth has 5 classes but the data has 3"):
        run("--teacher-ckpt", five)
    with pytest.raises(transfer.UserError, match="--teacher-ckpt .*mae_tiny.pth is not a ResNet checkpoint"):
        run("--teacher-ckpt", files["mae"])
    with pytest.raises(transfer.UserError, match=r"--teacher-ckpt .*\(--teacher resnet50\): .*layer1.0.conv1.weight"):
        run("--teacher", "resnet50")
    with pytest.raises(transfer.UserError, match="--pretrained .*teacher_r18.pth is not an MAE ViT checkpoint"):
        run("--pretrained", files["teacher"])
    with pytest.raises(transfer.UserError, match="fewer than one batch"):
        run("--batch-size", "64")
    with pytest.raises(transfer.UserError, match="--resume continues the run in --out; pass --out"):
        transfer.main(transfer.parse_args(["--loss", "ce", "--resume"]))


@pytest.mark.parametrize("argv,message", [
    (["--loss", "dkd", "--gt-weight", "0"], "needs ground-truth labels"),
    (["--loss", "ce", "--gt-weight", "0"], "--gt-weight must be > 0"),
    (["--loss", "kd"], "needs a teacher"),
    (["--loss", "ce", "--image-size", "100"], "not a multiple of the patch size"),
    (["--loss", "ce", "--benchmark", "5", "--eval-only", "x.pth"], "cannot be combined"),
    (["--loss", "ce", "--eval-only", "x.pth", "--resume"], "cannot be combined"),
    (["--loss", "ce", "--model", "vit_huge"], "invalid choice"),
    (["--loss", "ce", "--input-size", "224"], "unrecognized arguments"),   # renamed --image-size
])
def test_bad_arguments_stop_in_parse_args_before_any_data_is_read(argv, message):
    with pytest.raises(transfer.UserError) as refused:
        transfer.parse_args(argv)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("flag,value,message", [
    ("--epochs", "0", "> 0"), ("--epochs", "-1", "> 0"), ("--batch-size", "0", "> 0"), ("--lr", "0", "> 0"),
    ("--blr", "-1e-3", "> 0"), ("--tau", "0", "> 0"), ("--tau", "-1", "> 0"), ("--tau", "nan", "finite, got nan"),
    ("--kd-T", "0", "> 0"), ("--dkd-T", "inf", "finite, got inf"), ("--image-size", "0", "> 0"),
    ("--drop-path", "1.5", "in [0, 1]"), ("--label-smoothing", "-0.1", "in [0, 1]"), ("--workers", "-1", ">= 0"),
    ("--gt-weight", "-1", ">= 0"), ("--kd-weight", "nan", "finite"), ("--seed", "-3", ">= 0"),
    ("--benchmark", "-5", ">= 0"), ("--warmup-epochs", "6", "below --epochs 6"),
    ("--warmup-epochs", "9", "below --epochs 6"), ("--alpha-max", "1.5", "in [0, 1]"),
])
def test_bad_numbers_are_refused_naming_the_flag(flag, value, message):
    """One rule for every number (check_numbers): finite, > 0 for sizes, rates and temperatures, fractions (α of
    Eq. 1 too) in [0, 1]."""
    with pytest.raises(transfer.UserError) as refused:
        transfer.parse_args(["--loss", "adaptconf", "--teacher-ckpt", "t.pth", "--epochs", "6", f"{flag}={value}"])
    assert flag in str(refused.value) and message in str(refused.value), str(refused.value)


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "folder"])
def test_corrupt_checkpoints_and_folders_are_one_line_naming_the_flag_and_file(files, tmp_path, kind):
    """A cut-off download, random bytes, an empty file and a folder, as each checkpoint flag: one UserError line."""
    path = tmp_path / f"{kind}.pth"
    if kind == "folder":
        path.mkdir()
    else:
        with open(files["teacher"], "rb") as f:
            data = f.read()
        path.write_bytes({"truncated": data[:len(data) // 2], "random": random.Random(0).randbytes(4096),
                          "empty": b""}[kind])
    for flag in ("--teacher-ckpt", "--pretrained", "--eval-only"):
        with pytest.raises(transfer.UserError) as refused:
            transfer.main(transfer.parse_args(cli(files, tmp_path / "out", "--loss", "kd", flag, str(path))))
        message = str(refused.value)
        assert f"{flag} {path} is " in message and "\n" not in message, message
        assert ("a folder" if kind == "folder" else "not a readable weights-only PyTorch checkpoint") in message


def test_out_and_resume_refuse_what_would_mix_two_runs(files, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(transfer.UserError, match="--out .*file is a file; pass a folder"):
        transfer.main(transfer.parse_args(cli(files, tmp_path / "file", "--loss", "ce")))
    for extra in (["--eval-only", files["teacher"]], ["--benchmark", "1"]):   # no open_run: one json file to write
        with pytest.raises(transfer.UserError, match=r"--out .*file cannot be created \(File exists\)"):
            transfer.main(transfer.parse_args(cli(files, tmp_path / "file", "--loss", "ce", *extra)))
    out, args = tmp_path / "run", ("--loss", "ce", "--stop-after", "1")
    transfer.main(transfer.parse_args(cli(files, out, *args)))
    with pytest.raises(transfer.UserError, match="--out .*run holds a run .*pass --resume to continue it, --overwrite"):
        transfer.main(transfer.parse_args(cli(files, out, *args)))
    for changed, named in ((["--lr", "1e-3"], r"--lr \(.* there, 0.001 now\)"), (["--seed", "1"], "--seed")):
        with pytest.raises(transfer.UserError, match=f"--resume: the run in --out was started with other {named}"):
            transfer.main(transfer.parse_args(cli(files, out, *args, "--resume", *changed)))
    capsys.readouterr()
    transfer.main(transfer.parse_args(cli(files, out, *args, "--overwrite")))   # afresh: one epoch in the log, not two
    assert "a fresh run" in capsys.readouterr().out and [r["epoch"] for r in read_log(out)] == [0]


def truncate(path):   # a download cut off after 300 bytes
    with open(path, "rb") as f:
        head = f.read(300)
    with open(path, "wb") as f:
        f.write(head)


def test_an_unreadable_image_stops_the_run_naming_it_or_is_skipped_and_counted(files, tmp_path):
    """A truncated training JPEG (decoded in a DataLoader worker) and a truncated validation JPEG: by default the run
    stops with one line naming the file; --skip-bad-images trains on another image in its place and counts it
    (bad_images in the log), and leaves an unreadable validation image out of the score."""
    data = str(tmp_path / "data")
    make_image_tree(data, splits=("train",), num_classes=NUM_CLASSES, per_class=6, size=32, seed=0)
    make_image_tree(data, splits=("val",), num_classes=NUM_CLASSES, per_class=3, size=32, seed=1)
    bad_train = os.path.join(data, "train", "class_001", "0002.JPEG")
    truncate(bad_train)
    run = lambda out, *extra: transfer.main(transfer.parse_args(cli(   # noqa: E731
        files, tmp_path / out, "--data-dir", data, "--loss", "ce", "--epochs", "1", "--warmup-epochs", "0",
        "--batch-size", "3", *extra)))   # 18 images in batches of 3: every image is drawn once
    with pytest.raises(transfer.UserError, match=f"cannot read the image {bad_train} .*pass --skip-bad-images"):
        run("stopped", "--workers", "1")
    results = run("skipped", "--skip-bad-images", "--workers", "1")
    (record,) = read_log(tmp_path / "skipped")
    assert record["bad_images"] == 1 and results["images"] == 9
    bad_val = os.path.join(data, "val", "class_002", "0001.JPEG")
    truncate(bad_val)
    with pytest.raises(transfer.UserError, match=f"cannot read the image {bad_val} "):
        run("stopped_val", "--loss", "kd")   # the teacher is scored on the validation set before training
    assert run("skipped_val", "--skip-bad-images")["images"] == 8


def test_progress_lines_inside_an_epoch(monkeypatch, capsys):
    """train_one_epoch reports step, images/s and the ETA every 30 s (here: every step) on rank 0."""
    monkeypatch.setattr(transfer, "Progress", functools.partial(transfer.Progress, every=0.0))
    args, student, teacher, regressor = step_setup("ce")
    train_steps(args, student, teacher, regressor, uint8_images(24), torch.arange(24) % NUM_CLASSES)
    out = capsys.readouterr().out
    assert "step 1/4" in out and "step 3/4" in out and "images/s" in out and "the run in" in out
