"""common.py against independent references: explicit per-sample loops in float64 (plain Python math, no torch
softmax), torch.autograd.gradcheck, and the properties the paper and the DKD paper state."""
import math

import pytest
import torch
import torch.nn.functional as F

import common

torch.manual_seed(0)


# ------------------------------------------------------------------ slow float64 references (lists of floats)

def ref_log_softmax(row, T=1.0):
    z = [v / T for v in row]
    m = max(z)
    log_norm = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - log_norm for v in z]


def ref_kl(s_row, t_row, T):
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) for one sample."""
    ls, lt = ref_log_softmax(s_row, T), ref_log_softmax(t_row, T)
    return T * T * sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))


def ref_ce(row, k):
    return -ref_log_softmax(row)[k]


def argmax(row):
    return max(range(len(row)), key=lambda i: row[i])


def ref_beta(s_row, t_row, tau):
    ce_self, ce_teacher = ref_ce(s_row, argmax(s_row)), ref_ce(s_row, argmax(t_row))
    a, b = math.exp(ce_self / tau), math.exp(ce_teacher / tau)
    return a / (a + b)


def ref_kd(s, t, T):
    return sum(ref_kl(a, b, T) for a, b in zip(s, t)) / len(s)


def ref_augconf(s, t, alpha, T):
    return sum((1 - alpha) * ref_kl(a, b, T) + alpha * ref_ce(a, argmax(a)) for a, b in zip(s, t)) / len(s)


def ref_adaptconf(s, t, tau, T, beta_scale):
    total = 0.0
    for a, b in zip(s, t):
        beta = beta_scale * ref_beta(a, b, tau)
        total += (1 - beta) * ref_kl(a, b, T) + beta * ref_ce(a, argmax(a))
    return total / len(s)


def ref_dkd_terms(s_row, t_row, y, T):
    """(TCKD, NCKD) for one sample, written from the DKD paper's definitions."""
    ps = [math.exp(v) for v in ref_log_softmax(s_row, T)]
    pt = [math.exp(v) for v in ref_log_softmax(t_row, T)]
    bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
    tckd = sum(q * math.log(q / p) for p, q in zip(bs, bt))
    others = [i for i in range(len(s_row)) if i != y]
    qs = [ps[i] / (1 - ps[y]) for i in others]
    qt = [pt[i] / (1 - pt[y]) for i in others]
    nckd = sum(q * math.log(q / p) for p, q in zip(qs, qt))
    return T * T * tckd, T * T * nckd


def ref_dkd(s, t, y, alpha, beta, T):
    return sum(alpha * a + beta * b for a, b in (ref_dkd_terms(r, q, k, T) for r, q, k in zip(s, t, y))) / len(s)


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def ref_rkd(s, t, wd, wa):
    n = len(s)

    def dist(e, i, j):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(e[i], e[j])))

    def normalised_distances(e):
        d = [[dist(e, i, j) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mean for j in range(n)] for i in range(n)]

    def cos_at(e, j, i, k):   # angle at vertex j between e_i − e_j and e_k − e_j; 0 when a side is degenerate
        u = [a - b for a, b in zip(e[i], e[j])]
        v = [a - b for a, b in zip(e[k], e[j])]
        nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
        if nu == 0 or nv == 0:
            return 0.0
        return sum(a * b for a, b in zip(u, v)) / (nu * nv)

    ds, dt = normalised_distances(s), normalised_distances(t)
    loss_d = sum(smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n ** 2
    loss_a = sum(smooth_l1(cos_at(s, j, i, k), cos_at(t, j, i, k))
                 for i in range(n) for j in range(n) for k in range(n)) / n ** 3
    return wd * loss_d + wa * loss_a


def logits(b=6, c=7, scale=2.0, dtype=torch.float64, requires_grad=False):
    return (torch.randn(b, c, dtype=dtype) * scale).requires_grad_(requires_grad)


def agreeing_pair(b=6, c=7):
    """Student and teacher logits with the same argmax in every row (β = 0.5 everywhere, locally constant)."""
    s, t = logits(b, c), logits(b, c)
    top = t.argmax(1)
    s[torch.arange(b), top] = s.max(1).values + 1.0
    return s, t


# ------------------------------------------------------------------ KD

@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_reference(T):
    s, t = logits(), logits()
    assert common.kd_loss(s, t, T=T).item() == pytest.approx(ref_kd(s.tolist(), t.tolist(), T), rel=1e-10)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_gradient_is_difference_of_softmaxes(T):
    s, t = logits(requires_grad=True), logits()
    common.kd_loss(s, t, T=T).backward()
    expected = (F.softmax(s.detach() / T, 1) - F.softmax(t / T, 1)) * T / len(s)
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-12)


def test_kd_gradcheck():
    s, t = logits(4, 5, requires_grad=True), logits(4, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: common.kd_loss(a, b, T=2.0), (s, t))


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    s = logits()
    assert common.kd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert common.kd_loss(s, logits()).item() > 0


# ------------------------------------------------------------------ AugConf

def test_augconf_alpha_ramp():
    # 10 epochs, 30% warm-up → α reaches 0.5 at epoch 3 (0-indexed) and stays
    got = [common.augconf_alpha(e, 10) for e in range(10)]
    assert got == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert common.augconf_alpha(120, 240, alpha_max=0.9, warmup_frac=0.5) == pytest.approx(0.9)
    assert common.augconf_alpha(36, 240) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        common.augconf_alpha(0, 0)


@pytest.mark.parametrize("alpha,T", [(0.3, 1.0), (0.5, 4.0), (0.9, 2.0)])
def test_augconf_matches_reference(alpha, T):
    s, t = logits(), logits()
    got = common.augconf_loss(s, t, alpha, T=T).item()
    assert got == pytest.approx(ref_augconf(s.tolist(), t.tolist(), alpha, T), rel=1e-10)


def test_augconf_with_alpha_zero_is_kd():
    s, t = logits(), logits()
    assert common.augconf_loss(s, t, 0.0, T=3.0).item() == pytest.approx(common.kd_loss(s, t, T=3.0).item(), rel=1e-12)


def test_augconf_gradcheck():
    s, t = logits(4, 5, requires_grad=True), logits(4, 5)
    assert torch.autograd.gradcheck(lambda a: common.augconf_loss(a, t, 0.4, T=2.0), (s,))


# ------------------------------------------------------------------ AdaptConf

@pytest.mark.parametrize("tau", [0.1, 0.5, 4.0])
def test_adaptconf_beta_matches_reference(tau):
    s, t = logits(8, 10), logits(8, 10)
    want = [ref_beta(a, b, tau) for a, b in zip(s.tolist(), t.tolist())]
    torch.testing.assert_close(common.adaptconf_beta(s, t, tau=tau), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-10, atol=1e-14)


def test_adaptconf_beta_properties():
    s, t = logits(256, 10, scale=1.0, dtype=torch.float32, requires_grad=True), logits(256, 10, dtype=torch.float32)
    beta = common.adaptconf_beta(s, t, tau=0.5)
    assert beta.shape == (256,)
    assert not beta.requires_grad and beta.grad_fn is None      # detached: β weights the terms, it is not trained
    assert (beta > 0).all() and (beta <= 0.5).all()
    agree = s.argmax(1) == t.argmax(1)
    assert agree.any() and (~agree).any()
    assert (beta[agree] == 0.5).all()                            # exactly, not approximately
    assert (beta[~agree] < 0.5).all()


@pytest.mark.parametrize("tau,T,beta_scale", [(0.5, 1.0, 1.0), (4.0, 2.0, 1.0), (0.25, 10.0, 0.3)])
def test_adaptconf_matches_reference(tau, T, beta_scale):
    s, t = logits(), logits()
    got = common.adaptconf_loss(s, t, tau=tau, T=T, beta_scale=beta_scale).item()
    assert got == pytest.approx(ref_adaptconf(s.tolist(), t.tolist(), tau, T, beta_scale), rel=1e-10)


def test_adaptconf_gradcheck_where_beta_is_locally_constant():
    s, t = agreeing_pair(4, 5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: common.adaptconf_loss(a, t, tau=0.5, T=2.0), (s,))


def test_adaptconf_gradient_treats_beta_as_constant():
    """Where the argmaxes disagree β varies with s; its gradient must not flow. Compare with finite differences of
    the float64 reference evaluated with β frozen at its value."""
    s, t = logits(5, 6), logits(5, 6)
    tau, T = 0.5, 2.0
    frozen = [ref_beta(a, b, tau) for a, b in zip(s.tolist(), t.tolist())]

    def frozen_ref(rows):
        return sum((1 - bt) * ref_kl(a, b, T) + bt * ref_ce(a, argmax(a))
                   for a, b, bt in zip(rows, t.tolist(), frozen)) / len(rows)

    s_var = s.clone().requires_grad_(True)
    common.adaptconf_loss(s_var, t, tau=tau, T=T).backward()
    eps, rows = 1e-6, s.tolist()
    for b in range(len(rows)):
        for c in range(len(rows[0])):
            up = [r[:] for r in rows]
            down = [r[:] for r in rows]
            up[b][c] += eps
            down[b][c] -= eps
            numeric = (frozen_ref(up) - frozen_ref(down)) / (2 * eps)
            assert s_var.grad[b, c].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_adaptconf_with_agreement_everywhere_is_half_kd_half_self_ce():
    s, t = agreeing_pair()
    kd = common.kd_loss(s, t).item()
    self_ce = F.cross_entropy(s, s.argmax(1)).item()
    assert common.adaptconf_loss(s, t).item() == pytest.approx(0.5 * kd + 0.5 * self_ce, rel=1e-12)


def test_adaptconf_beta_scale_zero_is_kd():
    s, t = logits(), logits()
    assert common.adaptconf_loss(s, t, T=4.0, beta_scale=0.0).item() == pytest.approx(
        common.kd_loss(s, t, T=4.0).item(), rel=1e-12)


# ------------------------------------------------------------------ DKD

@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (1.0, 2.0, 1.0), (0.5, 0.5, 2.0)])
def test_dkd_matches_reference(alpha, beta, T):
    s, t, y = logits(), logits(), torch.randint(0, 7, (6,))
    got = common.dkd_loss(s, t, y, alpha=alpha, beta=beta, T=T).item()
    assert got == pytest.approx(ref_dkd(s.tolist(), t.tolist(), y.tolist(), alpha, beta, T), rel=1e-9)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_decomposition_identity(T):
    """DKD paper, Eq. 1, per sample: KD = TCKD + (1 − p_target of the teacher)·NCKD."""
    s, t, y = logits(16, 10), logits(16, 10), torch.randint(0, 10, (16,))
    tckd, nckd = common.dkd_terms(s, t, y, T=T)
    p_target_teacher = F.softmax(t / T, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(tckd + (1 - p_target_teacher) * nckd, common.kd_per_sample(s, t, T=T),
                               rtol=1e-9, atol=1e-12)


def test_dkd_gradcheck():
    s, t, y = logits(4, 5, requires_grad=True), logits(4, 5), torch.tensor([0, 3, 2, 4])
    assert torch.autograd.gradcheck(lambda a: common.dkd_loss(a, t, y, alpha=1.0, beta=8.0, T=4.0), (s,))


# ------------------------------------------------------------------ RKD

@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_matches_reference(weights):
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64) * 3
    got = common.rkd_loss(s, t, distance_weight=weights[0], angle_weight=weights[1]).item()
    assert got == pytest.approx(ref_rkd(s.tolist(), t.tolist(), *weights), rel=1e-9)


def test_rkd_is_invariant_to_scale_and_translation():
    s = torch.randn(6, 4, dtype=torch.float64)
    assert common.rkd_loss(s, 3 * s + 1).item() == pytest.approx(0.0, abs=1e-9)


def test_rkd_gradcheck():
    s, t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: common.rkd_loss(a, t), (s,))


def test_rkd_rejects_small_or_mismatched_batches():
    with pytest.raises(ValueError, match="at least 3"):
        common.rkd_loss(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="same batch size"):
        common.rkd_loss(torch.randn(4, 4), torch.randn(5, 4))


# ------------------------------------------------------------------ FitNet

@pytest.mark.parametrize("s_size,t_size", [(8, 8), (8, 4), (4, 8), (8, 6)])
def test_feature_regressor_maps_to_teacher_shape(s_size, t_size):
    reg = common.FeatureRegressor(5, 7, s_size, t_size)
    assert reg(torch.randn(2, 5, s_size, s_size)).shape == (2, 7, t_size, t_size)


def test_feature_regressor_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="cannot map"):
        common.FeatureRegressor(5, 7, 4, 16)


def test_hint_loss_matches_reference_and_gradcheck():
    a, b = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    flat_a, flat_b = a.flatten().tolist(), b.flatten().tolist()
    want = sum((x - y) ** 2 for x, y in zip(flat_a, flat_b)) / len(flat_a)
    assert common.hint_loss(a, b).item() == pytest.approx(want, rel=1e-12)
    a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: common.hint_loss(x, b), (a,))
    with pytest.raises(ValueError, match="equal shapes"):
        common.hint_loss(a, b[:, :2])


# ------------------------------------------------------------------ ReviewKD

def ref_avg_pool(fmap, level):
    """fmap: nested lists [C][H][W] with H divisible by level → [C][level][level]."""
    h = len(fmap[0])
    k = h // level
    return [[[sum(fmap[c][i * k + u][j * k + v] for u in range(k) for v in range(k)) / (k * k)
              for j in range(level)] for i in range(level)] for c in range(len(fmap))]


def ref_mse(a, b):
    fa = torch.tensor(a, dtype=torch.float64).flatten().tolist()
    fb = torch.tensor(b, dtype=torch.float64).flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(fa, fb)) / len(fa)


def ref_hcl(students, teachers):
    total = 0.0
    for fs, ft in zip(students, teachers):   # each [B][C][H][W]
        h = len(fs[0][0])
        loss, weight, weight_sum = ref_mse(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            weight /= 2
            pooled_s = [ref_avg_pool(x, level) for x in fs]
            pooled_t = [ref_avg_pool(x, level) for x in ft]
            loss += weight * ref_mse(pooled_s, pooled_t)
            weight_sum += weight
        total += loss / weight_sum
    return total


def test_hcl_matches_reference_and_gradcheck():
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 1, 1)]
    fs = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    ft = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    want = ref_hcl([f.tolist() for f in fs], [f.tolist() for f in ft])
    assert common.hcl_loss(fs, ft).item() == pytest.approx(want, rel=1e-10)
    small = [torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)]
    target = [torch.randn(1, 2, 4, 4, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda x: common.hcl_loss([x], target), tuple(small))


def test_reviewkd_fusion_outputs_teacher_shapes_and_trains():
    student_channels, teacher_channels, sizes = [16, 32, 64], [8, 24, 40], [8, 4, 1]
    fusion = common.ReviewKDFusion(student_channels, teacher_channels, sizes, mid_channels=16)
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 64, 1, 1)]
    out = fusion(feats)
    assert [tuple(o.shape) for o in out] == [(2, 8, 8, 8), (2, 24, 4, 4), (2, 40, 1, 1)]
    loss = common.hcl_loss(out, [torch.randn_like(o) for o in out])
    loss.backward()
    # the deepest student feature reaches every output through the fusion, so every ABF gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())


# ------------------------------------------------------------------ metrics

def test_topk_correct_and_accuracy_match_loops():
    x, y = torch.randn(50, 7), torch.randint(0, 7, (50,))
    rows = x.tolist()
    for k_list in [(1, 5), (1, 3, 10)]:
        want = []
        for k in k_list:
            hits = 0
            for row, label in zip(rows, y.tolist()):
                order = sorted(range(len(row)), key=lambda i: -row[i])[:k]
                hits += label in order
            want.append(hits)
        assert common.topk_correct(x, y, k_list).tolist() == want
        assert common.accuracy(x, y, k_list) == pytest.approx([100.0 * w / 50 for w in want])


# ------------------------------------------------------------------ precision and bad input

def test_losses_compute_in_float32_under_bf16_autocast():
    s32, t32, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    s16, t16 = s32.bfloat16(), t32.bfloat16()
    calls = {
        "kd": lambda s, t: common.kd_loss(s, t, T=4.0),
        "augconf": lambda s, t: common.augconf_loss(s, t, 0.3),
        "adaptconf": lambda s, t: common.adaptconf_loss(s, t),
        "dkd": lambda s, t: common.dkd_loss(s, t, y),
        "rkd": lambda s, t: common.rkd_loss(s, t),
    }
    for name, fn in calls.items():
        reference = fn(s16.float(), t16.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(s16, t16)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("fn", [
    lambda s, t: common.kd_loss(s, t),
    lambda s, t: common.augconf_loss(s, t, 0.5),
    lambda s, t: common.adaptconf_beta(s, t),
    lambda s, t: common.adaptconf_loss(s, t),
    lambda s, t: common.dkd_loss(s, t, torch.zeros(len(s), dtype=torch.long)),
])
def test_mismatched_logits_raise_value_error(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4, 10), torch.randn(4, 100))


def test_beta_counts_and_summary_match_a_loop():
    """Figure 3's β statistics against a plain loop: summed over two batches, as a script accumulates them."""
    torch.manual_seed(0)
    batches = [torch.rand(37) * 0.5, torch.tensor([0.5, 0.5, 0.0, 0.05, 0.4999, 0.25])]
    counts = sum(common.beta_counts(b) for b in batches)
    summary = common.beta_summary(counts, prefix="train_beta")
    values = [float(v) for b in batches for v in b]
    hist = [0] * 10
    for v in values:
        hist[min(int(v / 0.05), 9)] += 1   # bins [0, .05), ..., [.45, .5]: 0.5 itself falls in the last bin
    assert summary["train_beta_mean"] == pytest.approx(sum(values) / len(values))
    assert summary["train_beta_frac_half"] == pytest.approx(sum(v == 0.5 for v in values) / len(values))
    assert summary["train_beta_hist"] == pytest.approx([h / len(values) for h in hist])
    assert set(summary) == {"train_beta_mean", "train_beta_frac_half", "train_beta_hist"}


def test_dkd_and_rkd_need_no_host_sync():
    """DKD and RKD run inside every training step: no data-dependent shapes (masked_select, boolean indexing), which
    on CUDA make the host wait for the GPU (conftest.count_host_syncs)."""
    from conftest import count_host_syncs
    s, t, y = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
    with count_host_syncs() as counts:
        loss = common.dkd_loss(s, t, y) + common.rkd_loss(torch.randn(8, 5, requires_grad=True), torch.randn(8, 7))
        loss.backward()
    assert not counts, counts
