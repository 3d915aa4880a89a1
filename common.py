"""Losses and small model helpers shared by the five experiment scripts.

Everything here is a pure function or a plain nn.Module: no I/O, no argparse, no distributed state. Each loss takes
logits or features of shape (B, ...) and returns a scalar averaged over the batch. The ground-truth term
w_gt·CE(s, y) is added by the scripts, so "teacher only" training (Table 2b of the paper) is simply w_gt = 0.

Notation (paper, Eq. 1 and 2): s = student logits (B, C), t = teacher logits (B, C), y = labels (B,),
KL_T(s, t) = T²·KL(softmax(t/T) ‖ softmax(s/T)) summed over classes.

All losses compute in float32 even under bf16/fp16 autocast (a KL between two bf16 softmaxes loses most of its
digits); float64 inputs stay float64, so torch.autograd.gradcheck works on them.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "kd_loss", "kd_per_sample", "augconf_alpha", "augconf_loss", "adaptconf_beta", "adaptconf_loss",
    "dkd_terms", "dkd_loss", "rkd_loss", "FeatureRegressor", "hint_loss", "ABF", "ReviewKDFusion", "hcl_loss",
    "topk_correct", "accuracy", "beta_counts", "beta_summary",
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
