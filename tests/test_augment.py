"""common.py's batched AutoAugment / RandAugment against an independent slow reference: timm 0.6.12's per-image
definitions (timm/data/auto_augment.py: LEVEL_TO_ARG, _randomly_negate, the 'original' policy, the 'increasing'
RandAugment set) written out here for one PIL image at a time with PIL's own ImageOps / ImageEnhance / transform, on
real CIFAR-100 images and on crafted ones; then the draws' statistics over many images, and no host sync."""
import functools
import math
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import common
from conftest import count_host_syncs

CIFAR_V1_FILL, CIFAR_V1_TRANSLATE = (129, 124, 112), 14   # timm's img_mean and translate_const for cifar_v1.yaml
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


# ------------------------------------------------------------------ the slow reference: one PIL image, one op

def reference_op(img, name, magnitude, sign, fill, translate_const, translate_pct=0.45):
    """timm's AugmentOp.__call__ after its draws: LEVEL_TO_ARG[name](magnitude) then NAME_TO_OP[name], resampling
    bilinear (timm draws bilinear or bicubic; common.py uses bilinear)."""
    level = float(magnitude)

    def negate(v):   # _randomly_negate with its coin already drawn
        return -v if sign < 0 else v

    warp = dict(resample=Image.BILINEAR, fillcolor=fill)
    w, h = img.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name.startswith("Posterize"):
        bits = {"Posterize": 0, "PosterizeIncreasing": 4, "PosterizeOriginal": 4}[name]
        bits += -int(level / 10 * 4) if name == "PosterizeIncreasing" else int(level / 10 * 4)
        if bits >= 8:
            return img
        if bits == 0:   # today's Pillow refuses 0 bits; the Pillow of timm 0.6.12's time returned black
            return img.point([0] * 768)
        return ImageOps.posterize(img, bits)
    if name == "Solarize":
        return ImageOps.solarize(img, int(level / 10 * 256))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, 256 - int(level / 10 * 256))
    if name == "SolarizeAdd":
        add = int(level / 10 * 110)
        return img.point([min(255, v + add) if v < 128 else v for v in range(256)] * 3)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(level / 10 * 1.8 + 0.1)
    if name.endswith("Increasing"):
        factor = max(0.1, 1.0 + negate(level / 10 * 0.9))
        return getattr(ImageEnhance, name[:-len("Increasing")])(img).enhance(factor)
    if name == "Rotate":
        return img.rotate(negate(level / 10 * 30.0), **warp)
    matrix = {"ShearX": (1, negate(level / 10 * 0.3), 0, 0, 1, 0),
              "ShearY": (1, 0, 0, negate(level / 10 * 0.3), 1, 0),
              "TranslateX": (1, 0, negate(level / 10 * float(translate_const)), 0, 1, 0),
              "TranslateY": (1, 0, 0, 0, 1, negate(level / 10 * float(translate_const))),
              "TranslateXRel": (1, 0, negate(level / 10 * translate_pct) * w, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, negate(level / 10 * translate_pct) * h)}[name]
    return img.transform(img.size, Image.AFFINE, matrix, **warp)


def reference_batch(images, ops, magnitudes, signs, applied, fill, translate_const):
    """Per image, per column in order: the ops that fire. -> (uint8 (B, 3, H, W), per image: a geometric op fired)."""
    out, moved = [], []
    for b in range(len(images)):
        img = Image.fromarray(images[b].permute(1, 2, 0).numpy())
        names = [common.AUGMENT_OPS[int(ops[b, k])] for k in range(ops.shape[1]) if applied[b, k]]
        for k in range(ops.shape[1]):
            if applied[b, k]:
                img = reference_op(img, common.AUGMENT_OPS[int(ops[b, k])], magnitudes[b, k], signs[b, k], fill,
                                   translate_const)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        moved.append(bool(GEOMETRIC & set(names)))
    return torch.stack(out), moved


# ------------------------------------------------------------------ images

@functools.lru_cache(maxsize=1)
def read_cifar_test(data_dir):
    with open(os.path.join(data_dir, "cifar-100-python", "test"), "rb") as f:
        data = pickle.load(f, encoding="latin1")["data"]
    return np.asarray(data[[0, 7, 99, 512, 1000, 2024, 3333, 4096, 5000, 7777, 8191, 9999]], dtype=np.uint8)


@pytest.fixture
def cifar_images(cifar100_dir):
    """12 real CIFAR-100 test images, uint8 (12, 3, 32, 32)."""
    return torch.from_numpy(read_cifar_test(cifar100_dir).reshape(-1, 3, 32, 32).copy())


def square_batch(cifar_images):
    g = torch.Generator().manual_seed(1)
    return torch.cat([cifar_images, torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)])


def crafted_batch():
    """16x32 (not square: catches swapped axes) images at the ops' edge cases: one bright pixel among 511 dark ones
    (Equalize's table reaches 256, PIL clips it), a constant image (AutoContrast/Equalize leave it), a narrow range,
    two levels, a gradient, noise."""
    g = torch.Generator().manual_seed(2)
    imgs = torch.zeros(6, 3, 16, 32, dtype=torch.uint8)
    imgs[0, :, 3, 5] = 255
    imgs[1] = 77
    imgs[2] = torch.randint(100, 111, (3, 16, 32), generator=g, dtype=torch.uint8)
    imgs[3] = torch.where(torch.rand(3, 16, 32, generator=g) < 0.3, 40, 200).to(torch.uint8)
    imgs[4] = (torch.arange(32) * 8).to(torch.uint8).expand(3, 16, 32)
    imgs[5] = torch.randint(0, 256, (3, 16, 32), generator=g, dtype=torch.uint8)
    return imgs


# ------------------------------------------------------------------ 1. every op against PIL

@pytest.mark.parametrize("name", common.AUGMENT_OPS)
def test_each_op_matches_pil(name, cifar_images):
    """Colour ops pixel-exact; geometric ops: the same sampling points and fill as PIL's bilinear transform, so at most
    one grey level off (float32 against PIL's float64 before truncation), on at most 2% of the values, and the
    filled area the same to within 1% of the pixels."""
    g = torch.Generator().manual_seed(common.AUGMENT_OPS.index(name))
    for images in (square_batch(cifar_images), crafted_batch()):
        B = len(images)
        magnitudes = torch.rand(B, 1, generator=g) * 10
        magnitudes[:2, 0] = torch.tensor([10.0, 0.0])                  # the ends of the scale
        signs = torch.where(torch.rand(B, 1, generator=g) < 0.5, -1.0, 1.0)
        draws = (torch.full((B, 1), common.AUGMENT_OPS.index(name)), magnitudes, signs, torch.ones(B, 1, dtype=bool))
        got = common.apply_augment_ops(images, *draws, fill=CIFAR_V1_FILL, translate_const=CIFAR_V1_TRANSLATE)
        want, _ = reference_batch(images, *draws, fill=CIFAR_V1_FILL, translate_const=CIFAR_V1_TRANSLATE)
        assert got.dtype == torch.uint8 and got.shape == images.shape
        diff = (got.int() - want.int()).abs()
        if name not in GEOMETRIC:
            assert diff.max() == 0, f"{name}: {int((diff > 0).sum())} values differ from PIL"
        else:
            filled_got = (got == torch.tensor(CIFAR_V1_FILL).view(1, 3, 1, 1)).all(1)
            filled_want = (want == torch.tensor(CIFAR_V1_FILL).view(1, 3, 1, 1)).all(1)
            assert (filled_got != filled_want).float().mean() < 0.01, name
            inner = (~filled_got & ~filled_want).unsqueeze(1).expand_as(diff)
            assert diff[inner].max() <= 1 and (diff[inner] > 0).float().mean() < 0.02, name
        if name in ("Invert", "Equalize", "Rotate", "SolarizeAdd"):   # the op does something on these images
            assert (got != images).any()


# ------------------------------------------------------------------ 2. the whole policies, same draws

@pytest.mark.parametrize("policy", ["auto", "rand"])
def test_policy_matches_per_image_reference(policy, cifar_images):
    """auto_augment / rand_augment on 64 images = the per-image PIL reference applying the draws of *_draws taken
    from the same generator seed: pixel-exact where only colour ops fired, within interpolation error otherwise."""
    images = torch.cat([cifar_images] * 5 + [crafted_batch()[:, :, :, :16].repeat(1, 1, 2, 2)[:4]])   # (64, 3, 32, 32)
    if policy == "auto":
        got = common.auto_augment(images, torch.Generator().manual_seed(5), fill=CIFAR_V1_FILL,
                                  translate_const=CIFAR_V1_TRANSLATE)
        draws = common.auto_augment_draws(len(images), torch.Generator().manual_seed(5))
        want, moved = reference_batch(images, *draws, fill=CIFAR_V1_FILL, translate_const=CIFAR_V1_TRANSLATE)
    else:
        fill = (124, 116, 104)
        got = common.rand_augment(images, torch.Generator().manual_seed(6), fill=fill)
        draws = common.rand_augment_draws(len(images), torch.Generator().manual_seed(6))
        want, moved = reference_batch(images, *draws, fill=fill, translate_const=int(32 * 0.45))
    assert sum(moved) >= 8 and len(moved) - sum(moved) >= 8    # both kinds of images are there
    for b in range(len(images)):
        diff = (got[b].int() - want[b].int()).abs().float()
        if not moved[b]:
            assert diff.max() == 0, f"image {b}: ops {draws[0][b].tolist()} applied {draws[3][b].tolist()}"
        else:   # one grey level off before a later op (Equalize, Solarize, ...) may become more
            assert diff.mean() < 1.0 and (diff > 1).float().mean() < 0.02, f"image {b}"


# ------------------------------------------------------------------ 3. the draws' statistics

def clipped_normal_moments(mu, sigma, hi):
    """Mean and std of min(X, hi), X ~ N(mu, sigma) (the lower clip at 0 is 18 sigma away), and P(X >= hi)."""
    a = (hi - mu) / sigma
    pdf, tail = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * math.erfc(a / math.sqrt(2))
    body = 1 - tail   # E[Z; Z < a] = -pdf, E[Z²; Z < a] = body - a·pdf
    mean = mu + sigma * (-pdf + a * tail)
    second = sigma ** 2 * (body - a * pdf) + 2 * mu * sigma * (-pdf) + mu ** 2 * body + hi ** 2 * tail
    return mean, math.sqrt(second - mean ** 2), tail


def within(value, expected, n, p=None, sigmas=5):
    """|value − expected| within `sigmas` standard errors of a mean of n Bernoulli(p) draws."""
    p = expected if p is None else p
    return abs(value - expected) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_rand_augment_draw_statistics():
    n = 200_000
    ops, mags, signs, applied = common.rand_augment_draws(n, torch.Generator().manual_seed(0))
    assert ops.shape == mags.shape == signs.shape == applied.shape == (n, 2)
    counts = Counter(common.AUGMENT_OPS[i] for i in ops.flatten().tolist())
    assert set(counts) == set(common.RAND_AUGMENT_INCREASING) and len(counts) == 15
    assert all(within(c / (2 * n), 1 / 15, 2 * n) for c in counts.values()), counts
    assert within(applied.float().mean().item(), 0.5, 2 * n)
    assert within((signs < 0).float().mean().item(), 0.5, 2 * n) and set(signs.unique().tolist()) == {-1.0, 1.0}
    mean, std, at_top = clipped_normal_moments(9.0, 0.5, 10.0)
    assert abs(mags.mean().item() - mean) < 5 * std / math.sqrt(2 * n)
    assert abs(mags.std().item() - std) < 0.005 and abs(std - 0.5) < 0.02
    assert mags.max() == 10.0 and mags.min() >= 0 and within((mags == 10).float().mean().item(), at_top, 2 * n)
    # the two columns draw independently
    assert within((ops[:, 0] == ops[:, 1]).float().mean().item(), 1 / 15, n)


def test_auto_augment_draw_statistics():
    n = 200_000
    policy = common.AUTO_AUGMENT_ORIGINAL
    ops, mags, signs, applied = common.auto_augment_draws(n, torch.Generator().manual_seed(0), magnitude_std=0)
    # without noise each image's (op, magnitude) pairs name its sub-policy (5 sub-policies appear twice in the table)
    def code(op0, m0, op1, m1):
        return ((op0 * 11 + m0) * 100 + op1) * 11 + m1

    codes = torch.tensor([code(*[v for name, _, m in sub for v in (common.AUGMENT_OPS.index(name), m)])
                          for sub in policy])
    rows = code(ops[:, 0], mags[:, 0].long(), ops[:, 1], mags[:, 1].long()).unsqueeze(1) == codes   # (n, 25)
    assert rows.any(1).all()   # every draw is one of the table's sub-policies
    seen, fired = rows.sum(0).tolist(), [(rows & applied[:, k:k + 1]).sum(0).tolist() for k in range(2)]
    for s, sub in enumerate(policy):
        copies = sum(other == sub for other in policy)
        assert within(seen[s] / n, copies / 25, n), (sub, seen[s] / n)
        for k, (name, p, _) in enumerate(sub):   # each op fires with its own probability
            rate = fired[k][s] / seen[s]
            assert rate == p if p in (0.0, 1.0) else within(rate, p, seen[s]), (sub, rate)
    # with magnitude noise std 0.5: N(policy magnitude, 0.5), clipped to [0, 10] (Sharpness and ShearX occur once)
    ops, mags, signs, applied = common.auto_augment_draws(n, torch.Generator().manual_seed(1), magnitude_std=0.5)
    for name, m in (("Sharpness", 7.0), ("ShearX", 5.0)):
        picked = mags[ops == common.AUGMENT_OPS.index(name)]
        assert abs(len(picked) / n - 1 / 25) < 0.003
        assert abs(picked.mean().item() - m) < 0.02 and abs(picked.std().item() - 0.5) < 0.02, name
    # Rotate has magnitude 9 in 2 of its 6 places (8, 3 in the others): 1/3 of P(N(9, 0.5) >= 10) lands on 10
    rotate = mags[ops == common.AUGMENT_OPS.index("Rotate")]
    at_top = clipped_normal_moments(9.0, 0.5, 10.0)[2] / 3
    assert within((rotate == 10).float().mean().item(), at_top, len(rotate)) and mags.min() >= 0 and mags.max() <= 10
    assert within((signs < 0).float().mean().item(), 0.5, 2 * n)


# ------------------------------------------------------------------ 4. per image, no host sync

def test_per_image_and_no_host_sync(cifar_images):
    """One image repeated 64 times comes out in many different versions (each image draws its own ops), and the
    whole call reads nothing back to the host (the same operations count on the CPU as would sync on CUDA)."""
    images = cifar_images[3:4].repeat(64, 1, 1, 1)
    for fn in (common.auto_augment, common.rand_augment):
        common.auto_augment(images, torch.Generator().manual_seed(0))   # the policy tables move to the device once
        with count_host_syncs() as syncs:
            out = fn(images, torch.Generator().manual_seed(3))
        assert not syncs, dict(syncs)
        distinct = len({bytes(o.numpy()) for o in out})
        assert distinct >= 16, f"{fn.__name__}: only {distinct} different images out of 64"
        assert (out == images).all((1, 2, 3)).sum() < 32    # unchanged only where no op fired (or did nothing)
    with pytest.raises(ValueError, match="uint8"):
        common.auto_augment(images.float(), torch.Generator().manual_seed(0))
