"""Losses, small model helpers and batched AutoAugment/RandAugment shared by the five experiment scripts.

Everything here is a pure function or a plain nn.Module: no I/O, no argparse, no distributed state. Each loss takes
logits or features of shape (B, ...) and returns a scalar averaged over the batch. The ground-truth term
w_gt·CE(s, y) is added by the scripts, so "teacher only" training (Table 2b of the paper) is simply w_gt = 0.

Notation (paper, Eq. 1 and 2): s = student logits (B, C), t = teacher logits (B, C), y = labels (B,),
KL_T(s, t) = T²·KL(softmax(t/T) ‖ softmax(s/T)) summed over classes.

All losses compute in float32 even under bf16/fp16 autocast (a KL between two bf16 softmaxes loses most of its
digits); float64 inputs stay float64, so torch.autograd.gradcheck works on them.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "kd_loss", "kd_per_sample", "augconf_alpha", "augconf_loss", "adaptconf_beta", "adaptconf_loss",
    "dkd_terms", "dkd_loss", "rkd_loss", "FeatureRegressor", "hint_loss", "ABF", "ReviewKDFusion", "hcl_loss",
    "topk_correct", "accuracy", "beta_counts", "beta_summary", "AUGMENT_OPS", "AUTO_AUGMENT_ORIGINAL",
    "RAND_AUGMENT_INCREASING", "auto_augment_draws", "rand_augment_draws", "apply_augment_ops", "auto_augment",
    "rand_augment",
]


def _float32(fn):
    """Run `fn` with autocast off and half-precision tensor arguments promoted to float32."""
    def up(x):
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
            return x.float()
        if isinstance(x, (list, tuple)):
            return type(x)(up(v) for v in x)
        return x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
    return wrapper


def _check_logits(student_logits, teacher_logits):
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must both be (batch, classes) of the same shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape[0] == 0:
        raise ValueError("the batch is empty; pass at least one sample")


# ---------------------------------------------------------------------------------------------------------------
# Logit distillation: KD, AugConf (Eq. 1), AdaptConf (Eq. 2)
# ---------------------------------------------------------------------------------------------------------------

@_float32
def kd_per_sample(student_logits, teacher_logits, T=1.0):
    """(B,) per-sample T²·KL(softmax(t/T) ‖ softmax(s/T)) (Hinton 2015)."""
    _check_logits(student_logits, teacher_logits)
    log_p_student = F.log_softmax(student_logits / T, dim=1)   # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)   # (B, C)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)  # (B,)
    return kl * (T * T)   # T² keeps the gradient scale independent of T (Hinton 2015, Sec. 2)


def kd_loss(student_logits, teacher_logits, T=1.0):
    """Batch mean of T²·KL(softmax(t/T) ‖ softmax(s/T)); scalar. Gradient w.r.t. s is T·(p_s − p_t)/B."""
    return kd_per_sample(student_logits, teacher_logits, T=T).mean()


@_float32
def _self_ce_per_sample(student_logits):
    """(B,) CE(s, argmax s): cross-entropy of the student against its own hard label (target carries no gradient)."""
    return F.cross_entropy(student_logits, student_logits.detach().argmax(dim=1), reduction="none")


def augconf_alpha(epoch, epochs, alpha_max=0.5, warmup_frac=0.3):
    """α of Eq. 1 at a 0-indexed `epoch`: linear from 0 to `alpha_max` over the first `warmup_frac` of `epochs`,
    then constant (the official code's epoch-based ramp)."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    ramp_epochs = warmup_frac * epochs
    if ramp_epochs <= 0:
        return float(alpha_max)
    return float(alpha_max) * min(epoch / ramp_epochs, 1.0)


def augconf_loss(student_logits, teacher_logits, alpha, T=1.0):
    """Eq. 1 (Burns 2023): (1−α)·KD_T(s, t) + α·CE(s, argmax s); scalar (batch means)."""
    _check_logits(student_logits, teacher_logits)
    kd = kd_per_sample(student_logits, teacher_logits, T=T).mean()
    self_ce = _self_ce_per_sample(student_logits).mean()
    return (1.0 - alpha) * kd + alpha * self_ce


@_float32
def adaptconf_beta(student_logits, teacher_logits, tau=0.5):
    """β of Eq. 2, per sample; (B,) tensor, detached (β weights the two terms, it is not trained).

    β = exp(CE(s, argmax s)/τ) / (exp(CE(s, argmax s)/τ) + exp(CE(s, argmax t)/τ)).
    Both CEs share log Σ exp(s), so β = sigmoid((s[argmax t] − max s)/τ): β ∈ (0, 0.5], and β = 0.5 exactly where
    student and teacher agree on the top class. τ is the official code's "superalignment threshold" (the T of the
    paper's Figure 2).
    """
    _check_logits(student_logits, teacher_logits)
    s = student_logits.detach()
    s_at_teacher_top = s.gather(1, teacher_logits.detach().argmax(dim=1, keepdim=True)).squeeze(1)  # (B,)
    return torch.sigmoid((s_at_teacher_top - s.max(dim=1).values) / tau)


def adaptconf_loss(student_logits, teacher_logits, tau=0.5, T=1.0, beta_scale=1.0):
    """Eq. 2 (AdaptConf): mean_b[(1−β_b)·KD_T(s_b, t_b)] + mean_b[β_b·CE(s_b, argmax s_b)]; scalar.

    β_b = beta_scale·adaptconf_beta(s, t, tau); `beta_scale` < 1 is the linear warm-up over the first 25% of epochs
    used by the official few-shot and noisy-label code (the classification code uses 1).
    """
    beta = beta_scale * adaptconf_beta(student_logits, teacher_logits, tau=tau)     # (B,), detached
    kd = kd_per_sample(student_logits, teacher_logits, T=T)                         # (B,)
    self_ce = _self_ce_per_sample(student_logits)                                    # (B,)
    return ((1.0 - beta) * kd).mean() + (beta * self_ce).mean()


# ---------------------------------------------------------------------------------------------------------------
# DKD (Zhao 2022)
# ---------------------------------------------------------------------------------------------------------------

@_float32
def dkd_terms(student_logits, teacher_logits, targets, T=4.0):
    """Per-sample (TCKD, NCKD), each (B,) and already multiplied by T².

    TCKD = KL between the binary distributions [p_target, 1 − p_target] of teacher and student;
    NCKD = KL between the distributions over the non-target classes (target logit masked before the softmax).
    Identity (DKD paper, Eq. 1): T²·KL = TCKD + (1 − p_target of the teacher)·NCKD.
    """
    _check_logits(student_logits, teacher_logits)
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(f"targets must have shape ({student_logits.shape[0]},), got {tuple(targets.shape)}")
    target_mask = F.one_hot(targets, student_logits.shape[1]).to(torch.bool)         # (B, C)

    def binary_log_probs(logits):   # (B, 2): log p_target, log(1 − p_target), stable for p_target → 1
        log_p = F.log_softmax(logits / T, dim=1)
        log_target = log_p.gather(1, targets[:, None]).squeeze(1)   # gather, not masked_select: no host sync
        log_rest = torch.logsumexp(log_p.masked_fill(target_mask, float("-inf")), dim=1)
        return torch.stack([log_target, log_rest], dim=1)

    tckd = F.kl_div(binary_log_probs(student_logits), binary_log_probs(teacher_logits),
                    reduction="none", log_target=True).sum(dim=1)
    # subtracting 1000 from the target logit removes it from the softmax (exp(−1000) is exactly 0 in float32/64)
    log_q_student = F.log_softmax(student_logits / T - 1000.0 * target_mask, dim=1)
    log_q_teacher = F.log_softmax(teacher_logits / T - 1000.0 * target_mask, dim=1)
    nckd = F.kl_div(log_q_student, log_q_teacher, reduction="none", log_target=True).sum(dim=1)
    return tckd * (T * T), nckd * (T * T)


def dkd_loss(student_logits, teacher_logits, targets, alpha=1.0, beta=8.0, T=4.0):
    """DKD: batch mean of α·TCKD + β·NCKD; scalar. The caller adds CE(s, y) and multiplies this by the epoch
    warm-up factor min(epoch/warmup, 1) where its recipe has one."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, T=T)
    return (alpha * tckd + beta * nckd).mean()


# ---------------------------------------------------------------------------------------------------------------
# RKD (Park 2019)
# ---------------------------------------------------------------------------------------------------------------

def _normalized_distances(embed):
    """(B, B) pairwise Euclidean distances divided by their mean over distinct pairs."""
    diff = embed.unsqueeze(1) - embed.unsqueeze(0)                        # (B, B, D)
    off_diagonal = ~torch.eye(len(embed), dtype=torch.bool, device=embed.device)
    # clamp keeps sqrt differentiable on the diagonal, which is then zeroed
    dist = diff.pow(2).sum(dim=2).clamp_min(1e-12).sqrt() * off_diagonal
    # mean over the B·(B − 1) distinct pairs; the diagonal is zero (a sum, not boolean indexing: no host sync)
    return dist / (dist.sum() / (len(embed) * (len(embed) - 1))).clamp_min(1e-12)


def _triplet_cosines(embed):
    """(B·B·B,) cos of the angle at vertex j of every triplet (i, j, k): <e_i − e_j, e_k − e_j> normalised."""
    diff = F.normalize(embed.unsqueeze(0) - embed.unsqueeze(1), p=2, dim=2)   # (B, B, D), row j: e_i − e_j
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


@_float32
def rkd_loss(student_embed, teacher_embed, distance_weight=25.0, angle_weight=50.0):
    """RKD: distance_weight·smoothL1(ψ_D(s), ψ_D(t)) + angle_weight·smoothL1(ψ_A(s), ψ_A(t)); scalar.

    student_embed (B, Ds) and teacher_embed (B, Dt) are the pooled penultimate features; the dimensions may differ
    (RKD compares relations between samples, not features). Needs B ≥ 3 for angles.
    """
    if student_embed.dim() != 2 or teacher_embed.dim() != 2 or len(student_embed) != len(teacher_embed):
        raise ValueError(f"RKD needs (batch, dim) embeddings with the same batch size; got "
                         f"{tuple(student_embed.shape)} and {tuple(teacher_embed.shape)}")
    if len(student_embed) < 3:
        raise ValueError(f"RKD needs a batch of at least 3 samples for its angle term; got {len(student_embed)}")
    teacher_embed = teacher_embed.detach()
    loss_distance = F.smooth_l1_loss(_normalized_distances(student_embed), _normalized_distances(teacher_embed))
    loss_angle = F.smooth_l1_loss(_triplet_cosines(student_embed), _triplet_cosines(teacher_embed))
    return distance_weight * loss_distance + angle_weight * loss_angle


# ---------------------------------------------------------------------------------------------------------------
# FitNet (Romero 2014)
# ---------------------------------------------------------------------------------------------------------------

class FeatureRegressor(nn.Module):
    """Maps a student feature map (B, Cs, Hs, Ws) to the teacher's shape (B, Ct, Ht, Wt): conv + BN + ReLU.

    Spatial sizes are adapted as in mdistiller's ConvReg: Hs = 2·Ht → 3x3 conv stride 2; 2·Hs = Ht → 4x4 transposed
    conv stride 2; Hs ≥ Ht → a valid conv of kernel (1 + Hs − Ht, 1 + Ws − Wt) (1x1 when the sizes agree).
    """

    def __init__(self, student_channels, teacher_channels, student_size, teacher_size, use_relu=True):
        super().__init__()
        (hs, ws), (ht, wt) = _pair(student_size), _pair(teacher_size)
        if hs == 2 * ht and ws == 2 * wt:
            self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, stride=2, padding=1)
        elif 2 * hs == ht and 2 * ws == wt:
            self.conv = nn.ConvTranspose2d(student_channels, teacher_channels, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise ValueError(f"FitNet cannot map a {hs}x{ws} student feature map to a {ht}x{wt} teacher one; pick a "
                             "hint layer whose student map is at least as large as the teacher's or exactly half")
        self.bn = nn.BatchNorm2d(teacher_channels)
        self.use_relu = use_relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


@_float32
def hint_loss(student_regressed, teacher_feature):
    """FitNet hint: mean squared error between the regressed student map and the teacher map (same shape)."""
    if student_regressed.shape != teacher_feature.shape:
        raise ValueError(f"hint_loss needs equal shapes; got {tuple(student_regressed.shape)} and "
                         f"{tuple(teacher_feature.shape)} (map the student through FeatureRegressor first)")
    return F.mse_loss(student_regressed, teacher_feature.detach())


# ---------------------------------------------------------------------------------------------------------------
# ReviewKD (Chen 2021): attention-based fusion (ABF) and the hierarchical context loss (HCL)
# ---------------------------------------------------------------------------------------------------------------

class ABF(nn.Module):
    """Attention-based fusion: fuses a student feature with the fused result of the deeper stage.

    forward(x (B, Cin, H, W), deeper (B, Cmid, h, w) or None, out_size) → (output (B, Cout, out, out) to compare with
    the teacher, fused (B, Cmid, H, W) passed on to the next shallower stage).
    """

    def __init__(self, in_channels, mid_channels, out_channels, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        # the fusion weights: 2 sigmoid maps, one for this stage and one for the deeper stage
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, deeper=None, out_size=None):
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            att = self.att_conv(torch.cat([x, deeper], dim=1))                   # (B, 2, H, W)
            x = x * att[:, 0:1] + deeper * att[:, 1:2]
        if out_size is not None and x.shape[-1] != out_size:
            x = F.interpolate(x, size=(out_size, out_size), mode="nearest")
        return self.conv2(x), x


class ReviewKDFusion(nn.Module):
    """The ReviewKD student head: one ABF per stage, applied from the deepest feature to the shallowest.

    forward(features) takes the student's features shallow → deep, each (B, Cs_i, H_i, W_i) (the pooled embedding
    as a 1x1 map is the usual last one), and returns a list, shallow → deep, shaped like the teacher's features
    (B, Ct_i, out_sizes[i], out_sizes[i]).
    """

    def __init__(self, student_channels, teacher_channels, out_sizes, mid_channels):
        super().__init__()
        if not (len(student_channels) == len(teacher_channels) == len(out_sizes)):
            raise ValueError("ReviewKDFusion needs one student channel count, teacher channel count and output size "
                             f"per stage; got {len(student_channels)}, {len(teacher_channels)}, {len(out_sizes)}")
        n = len(student_channels)
        self.out_sizes = list(out_sizes)
        self.abfs = nn.ModuleList(ABF(cs, mid_channels, ct, fuse=i < n - 1)
                                  for i, (cs, ct) in enumerate(zip(student_channels, teacher_channels)))

    def forward(self, features):
        outputs, fused = [], None
        for i in reversed(range(len(features))):
            out, fused = self.abfs[i](features[i], fused, self.out_sizes[i])
            outputs.append(out)
        return outputs[::-1]


@_float32
def hcl_loss(student_features, teacher_features):
    """Hierarchical context loss, summed over stages: per stage, MSE at full resolution (weight 1) plus MSE after
    adaptive average pooling to 4x4, 2x2, 1x1 (weights 1/2, 1/4, 1/8; levels not smaller than the map are skipped),
    divided by the sum of the weights used."""
    if len(student_features) != len(teacher_features):
        raise ValueError(f"hcl_loss needs one teacher feature per student feature; got {len(student_features)} and "
                         f"{len(teacher_features)}")
    total = 0.0
    for fs, ft in zip(student_features, teacher_features):
        if fs.shape != ft.shape:
            raise ValueError(f"hcl_loss needs equal shapes per stage; got {tuple(fs.shape)} and {tuple(ft.shape)}")
        ft = ft.detach()
        loss, weight, weight_sum = F.mse_loss(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= fs.shape[-1]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weight_sum += weight
        total = total + loss / weight_sum
    return total


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def topk_correct(logits, targets, topk=(1, 5)):
    """(len(topk),) float tensor: how many samples have their target among the k highest logits, for each k.
    k larger than the number of classes counts as the number of classes. Counts (not means) so that distributed
    evaluation can all-reduce them exactly."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"accuracy needs (batch, classes) logits and (batch,) targets; got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    kmax = min(max(topk), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                               # (B, kmax)
    hits = top.eq(targets.unsqueeze(1))                                  # (B, kmax), at most one True per row
    return torch.stack([hits[:, :min(k, kmax)].any(dim=1).sum() for k in topk]).float()


def accuracy(logits, targets, topk=(1, 5)):
    """List of top-k accuracies in percent, one per k in `topk`."""
    return (topk_correct(logits, targets, topk) * (100.0 / max(len(targets), 1))).tolist()


@torch.no_grad()
def beta_counts(beta):
    """Figure 3's statistics of β (Eq. 2) for one batch as sums, a (13,) float tensor: [samples, Σβ, #(β = 0.5),
    10-bin histogram of β over [0, 0.5]]. Add them over batches and processes (no host sync), then beta_summary."""
    beta = beta.detach().float().flatten()
    return torch.cat([beta.new_full((1,), float(len(beta))), beta.sum().view(1), (beta == 0.5).sum().view(1).float(),
                      torch.histc(beta, bins=10, min=0.0, max=0.5)])


def beta_summary(counts, prefix="beta"):
    """{prefix_mean, prefix_frac_half, prefix_hist (fraction of samples per bin)} from summed beta_counts."""
    n, total, half, *hist = counts.tolist()
    n = max(n, 1.0)
    return {f"{prefix}_mean": total / n, f"{prefix}_frac_half": half / n, f"{prefix}_hist": [h / n for h in hist]}


# ---------------------------------------------------------------------------------------------------------------
# AutoAugment and RandAugment as timm 0.6.12 defines them (timm/data/auto_augment.py, on PIL images, one image at a
# time), here on a uint8 (B, 3, H, W) batch on the device: every image draws its own ops, all images in one pass
# ---------------------------------------------------------------------------------------------------------------

AUGMENT_OPS = (  # timm's NAME_TO_OP
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
    "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing",
    "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateX",
    "TranslateY", "TranslateXRel", "TranslateYRel")
# auto_augment_policy_original (the AutoAugment paper's ImageNet policy): 25 sub-policies of (op, probability,
# magnitude) pairs
AUTO_AUGMENT_ORIGINAL = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)), (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)), (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)), (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)), (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)))
RAND_AUGMENT_INCREASING = (  # _RAND_INCREASING_TRANSFORMS ('inc1')
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel")


@functools.lru_cache(maxsize=None)
def _policy_tables(device):
    """The op tables on `device`, copied there once (a copy per call would make the host wait on CUDA)."""
    ops = [[AUGMENT_OPS.index(name) for name, _, _ in sub] for sub in AUTO_AUGMENT_ORIGINAL]
    probs = [[p for _, p, _ in sub] for sub in AUTO_AUGMENT_ORIGINAL]
    mags = [[float(m) for _, _, m in sub] for sub in AUTO_AUGMENT_ORIGINAL]
    rand_ops = [AUGMENT_OPS.index(name) for name in RAND_AUGMENT_INCREASING]
    return (torch.tensor(ops, device=device), torch.tensor(probs, device=device), torch.tensor(mags, device=device),
            torch.tensor(rand_ops, device=device))


def _noisy_magnitudes(mean, std, generator):
    """timm's AugmentOp: magnitude ~ N(mean, std) (uniform on [0, mean] for std = inf), clipped to [0, 10]."""
    if math.isinf(std):
        mean = mean * torch.rand(mean.shape, generator=generator, device=mean.device)
    elif std > 0:
        mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
    return mean.clamp(0.0, 10.0)


def _random_signs(shape, generator):
    """±1 with probability 0.5 each (timm's _randomly_negate; used only by the ops that negate)."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    return torch.where(u < 0.5, -1.0, 1.0)


def auto_augment_draws(batch, generator, magnitude_std=0.5):
    """timm AutoAugment 'original' policy draws per image -> (ops, magnitudes, signs, applied), each (batch, 2):
    op index into AUGMENT_OPS, magnitude in [0, 10] (policy magnitude + N(0, std) noise, clipped as timm does),
    random sign ±1, and whether the op fires (the sub-policy's probability). One sub-policy per image, uniformly."""
    device = generator.device
    ops, probs, mags, _ = _policy_tables(device)
    pick = torch.randint(len(AUTO_AUGMENT_ORIGINAL), (batch,), generator=generator, device=device)   # (B,)
    applied = torch.rand((batch, 2), generator=generator, device=device) < probs[pick]
    return ops[pick], _noisy_magnitudes(mags[pick], magnitude_std, generator), _random_signs((batch, 2), generator), \
        applied


def rand_augment_draws(batch, generator, magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5):
    """timm RandAugment 'rand-m9-mstd0.5-inc1' draws: num_ops ops chosen uniformly with replacement from the
    'increasing' op set, each applied with probability prob, magnitude N(magnitude, std) clipped to [0, 10]."""
    device = generator.device
    rand_ops = _policy_tables(device)[3]
    ops = rand_ops[torch.randint(len(rand_ops), (batch, num_ops), generator=generator, device=device)]
    applied = torch.rand((batch, num_ops), generator=generator, device=device) < prob
    mags = _noisy_magnitudes(torch.full((batch, num_ops), float(magnitude), device=device), magnitude_std, generator)
    return ops, mags, _random_signs((batch, num_ops), generator), applied


def _autocontrast_lut(hist):
    """PIL ImageOps.autocontrast per image and channel: (..., 256) histogram -> (..., 256) lookup table."""
    i = torch.arange(256, device=hist.device)
    lo = torch.where(hist > 0, i, 256).amin(-1, keepdim=True)
    hi = torch.where(hist > 0, i, -1).amax(-1, keepdim=True)
    # PIL: scale = 255.0 / (hi - lo), int(ix * scale - lo * scale) in float64 (a true division: torch computes
    # scalar / tensor as a reciprocal times the scalar, one ulp off)
    scale = torch.full_like(hi, 255, dtype=torch.float64) / (hi - lo).clamp_min(1)
    lut = (i * scale + (-lo) * scale).trunc().clamp(0, 255).long()
    return torch.where(hi <= lo, i, lut)


def _equalize_lut(hist):
    """PIL ImageOps.equalize per image and channel: step = (pixels - count of the last used level) // 255,
    lut[v] = (step // 2 + pixels below v) // step, identity when step = 0 or one level is used; PIL clips to 255."""
    i = torch.arange(256, device=hist.device)
    last = torch.where(hist > 0, i, 0).amax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    lut = (step // 2 + hist.cumsum(-1) - hist) // step.clamp_min(1)
    return torch.where(((hist > 0).sum(-1, keepdim=True) <= 1) | (step == 0), i, lut.clamp_max(255))


def _augment_column(images, op, level, sign, fill, translate_const, translate_pct):
    """Applies one op per image: images uint8 (B, 3, H, W), op (B,) index into AUGMENT_OPS (-1: none), level =
    magnitude / 10 and sign (B,) float64. Three passes, each the identity for the images whose op is of another kind:
    lookup tables (point ops), blends (PIL ImageEnhance), one affine warp (geometric ops)."""
    B, C, H, W = images.shape
    dev = images.device

    onehot = op.unsqueeze(1) == torch.arange(len(AUGMENT_OPS), device=dev)     # (B, ops); op -1: no column

    def is_(*names):   # (B,) bool: the image's op is one of `names`
        return functools.reduce(torch.logical_or, [onehot[:, AUGMENT_OPS.index(n)] for n in names])

    # 1. point ops as one (B, 3, 256) lookup table per image and channel, level -> argument as timm's LEVEL_TO_ARG
    i = torch.arange(256, device=dev)
    x = images.reshape(B, C, H * W).long()
    hist = torch.zeros(B, C, 256, dtype=torch.long, device=dev).scatter_add_(2, x, torch.ones_like(x))
    q = (level * 4).floor()
    bits = torch.where(is_("Posterize"), q, torch.where(is_("PosterizeIncreasing"), 4 - q, q + 4)).long()
    shift = (8 - bits).clamp_min(0).view(B, 1, 1)   # bits >= 8: unchanged; 0 bits: black (Pillow now refuses 0)
    s = (level * 256).floor()
    threshold = torch.where(is_("Solarize"), s, 256 - s).long().view(B, 1, 1)
    add = (level * 110).floor().long().view(B, 1, 1)
    lut = i.expand(B, C, 256)
    for names, table in ((("Invert",), 255 - i),
                         (("Posterize", "PosterizeIncreasing", "PosterizeOriginal"), (i >> shift) << shift),
                         (("Solarize", "SolarizeIncreasing"), torch.where(i < threshold, i, 255 - i)),
                         (("SolarizeAdd",), torch.where(i < 128, (i + add).clamp_max(255), i)),
                         (("AutoContrast",), _autocontrast_lut(hist)), (("Equalize",), _equalize_lut(hist))):
        lut = torch.where(is_(*names).view(B, 1, 1), table, lut)
    img = lut.float().gather(2, x).view(B, C, H, W)   # whole values in float32 from here on

    # 2. PIL ImageEnhance: Image.blend(degenerate, image, factor) = trunc(d + factor·(image − d)) in float32, clipped
    r, g, b = img.unbind(1)   # PIL's convert("L"), (R·19595 + G·38470 + B·7471 + 2^15) >> 16, exact below 2^24
    gray = ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor().unsqueeze(1)             # (B, 1, H, W)
    total = gray.sum((1, 2, 3), dtype=torch.int64)
    mean = (2 * total + H * W) // (2 * H * W)              # ImageEnhance.Contrast: int(mean of L + 0.5)
    # PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded; border pixels kept) as exact sums
    rows = img[:, :, :-2] + img[:, :, 1:-1] + img[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4 * img[:, :, 1:-1, 1:-1]
    smooth = img.clone()
    # (S + 6) // 13 as floor((S + 6.5) / 13): never within 1/26 of a whole number, so float division cannot misround
    smooth[:, :, 1:-1, 1:-1] = ((box + 6.5) / 13).floor()
    constant = torch.where(is_("Contrast", "ContrastIncreasing"), mean, 0.0).float().view(B, 1, 1, 1)
    degenerate = torch.where(is_("Color", "ColorIncreasing").view(B, 1, 1, 1), gray,
                             torch.where(is_("Sharpness", "SharpnessIncreasing").view(B, 1, 1, 1), smooth, constant))
    factor = torch.where(is_("Color", "Contrast", "Brightness", "Sharpness"), level * 1.8 + 0.1,
                         torch.where(is_("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                         "SharpnessIncreasing"), (1.0 + sign * (level * 0.9)).clamp_min(0.1), 1.0))
    factor = factor.float().view(B, 1, 1, 1)    # factor 1 (every other op) returns the image exactly
    img = (degenerate + factor * (img - degenerate)).clamp(0, 255).floor()

    # 3. geometric ops as PIL's Image.transform(AFFINE): the output pixel centre (x + ½, y + ½) reads the input at
    # (a·x' + b·y' + c, d·x' + e·y' + f); points outside [0, W) x [0, H) get the fill colour
    theta = torch.where(is_("Rotate"), -torch.deg2rad(level * 30 * sign), 0.0)   # Image.rotate about the centre
    cos, sin = theta.cos(), theta.sin()
    shear = level * 0.3 * sign
    tx = torch.where(is_("TranslateX"), level * translate_const * sign,
                     torch.where(is_("TranslateXRel"), level * translate_pct * sign * W, 0.0))
    ty = torch.where(is_("TranslateY"), level * translate_const * sign,
                     torch.where(is_("TranslateYRel"), level * translate_pct * sign * H, 0.0))
    rotate, cx, cy = is_("Rotate"), W / 2, H / 2
    a = torch.stack([cos, torch.where(is_("ShearX"), shear, sin), torch.where(rotate, cx - cos * cx - sin * cy, tx),
                     torch.where(is_("ShearY"), shear, -sin), cos, torch.where(rotate, cy + sin * cx - cos * cy, ty)],
                    1).float().view(B, 6, 1, 1)
    xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    ys = torch.arange(H, device=dev, dtype=torch.float32).view(H, 1) + 0.5
    x_in = a[:, 0] * xs + (a[:, 1] * ys + a[:, 2])    # (B, 1, W) + (B, H, 1) -> (B, H, W), in input pixels
    y_in = a[:, 3] * xs + (a[:, 4] * ys + a[:, 5])
    inside = ((x_in >= 0) & (x_in < W) & (y_in >= 0) & (y_in < H)).unsqueeze(1)
    # bilinear for every geometric op (timm draws bilinear or bicubic per op; PIL's bicubic (a = -0.5) is not
    # grid_sample's (a = -0.75), and one mode keeps it one pass); align_corners=False and border padding are PIL's
    # centre convention and edge clamping; PIL truncates, +1e-3 absorbs float32 error at whole values
    warped = F.grid_sample(img, torch.stack([x_in * (2 / W) - 1, y_in * (2 / H) - 1], -1), mode="bilinear",
                           padding_mode="border", align_corners=False)
    channel = torch.arange(C, device=dev).view(1, C, 1, 1)
    fill = torch.where(channel == 0, float(fill[0]), torch.where(channel == 1, float(fill[1]), float(fill[2])))
    warped = torch.where(inside, (warped + 1e-3).floor(), fill)   # a convex combination: stays in [0, 255]
    geometric = is_("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
    return torch.where(geometric.view(B, 1, 1, 1), warped, img).to(torch.uint8)


@_float32
def apply_augment_ops(images, ops, magnitudes, signs, applied, fill, translate_const=None, translate_pct=0.45):
    """images uint8 (B, 3, H, W) on any device -> uint8 (B, 3, H, W); the ops of each column applied in order, every
    image its own op and magnitude, all in batched tensor ops (no Python loop over images, no host sync).

    ops, magnitudes, signs, applied: (B, K) from auto_augment_draws / rand_augment_draws. fill: the RGB colour of
    pixels a geometric op moves in (timm: img_mean = round(255·mean)). translate_const: pixels of TranslateX/Y at
    magnitude 10 (timm: int(0.45·min(H, W)), the default here); translate_pct: the same for TranslateX/YRel."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"augmentation needs uint8 images of shape (batch, 3, H, W); got {images.dtype} "
                         f"{tuple(images.shape)}")
    if translate_const is None:
        translate_const = int(min(images.shape[-2:]) * 0.45)
    for k in range(ops.shape[1]):
        op = torch.where(applied[:, k], ops[:, k], -1)
        images = _augment_column(images, op, magnitudes[:, k].double() / 10.0, signs[:, k].double(), fill,
                                 float(translate_const), float(translate_pct))
    return images


def auto_augment(images, generator, magnitude_std=0.5, fill=(124, 116, 104), translate_const=None):
    """timm's AutoAugment 'original-mstd{magnitude_std}' on a uint8 (B, 3, H, W) batch, per image."""
    draws = auto_augment_draws(len(images), generator, magnitude_std=magnitude_std)
    return apply_augment_ops(images, *draws, fill=fill, translate_const=translate_const)


def rand_augment(images, generator, magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5, fill=(124, 116, 104)):
    """timm's RandAugment 'rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1' on a uint8 (B, 3, H, W) batch."""
    draws = rand_augment_draws(len(images), generator, magnitude, num_ops, prob, magnitude_std)
    return apply_augment_ops(images, *draws, fill=fill)
