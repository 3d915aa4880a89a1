"""Tests of noisy.py: label-noise maps and rates, PreAct ResNet sizes, Sel-CL's selection, end-to-end runs
(teacher → student, every distillation loss, 2-process torchrun, resume) and errors. CPU only, tiny models."""
import collections
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import noisy
from conftest import ROOT, run_torchrun, syncs_per_step

# the small learnable synthetic set (4 colour/stripe classes, 128 + 63 images of 16x16) and a 1/8-width PreAct ResNet-18
TINY = ["--dataset", "synthetic", "--model", "preact_resnet18_w8", "--teacher", "preact_resnet18_w8",
        "--batch-size", "32", "--knn-k", "20", "--warmup-epochs", "0", "--noise-rate", "0.4"]


def run(out, *extra):
    return noisy.main(noisy.parse_args(TINY + ["--out", str(out), *extra]))


def refused(*argv):
    """The one line with which noisy.py refuses TINY + argv (in parse_args or in main): a UserError, no traceback."""
    with pytest.raises(noisy.UserError) as excinfo:
        noisy.main(noisy.parse_args(TINY + [str(a) for a in argv]))
    message = str(excinfo.value)
    assert ": error: " in message and "\n" not in message
    return message


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher trained with plain Sel-CL+ (--loss ce): 2 Sel-CL epochs (1 warm-up), 1 fine-tuning epoch."""
    out = tmp_path_factory.mktemp("teacher")
    run(out, "--epochs", "2", "--finetune-epochs", "1")
    return out


# ---- models ---------------------------------------------------------------------------------------------------

def test_preact_resnet_sizes_and_outputs():
    assert sum(p.numel() for p in noisy.MODELS["preact_resnet18"](10).parameters()) == 11_236_938
    assert sum(p.numel() for p in noisy.MODELS["preact_resnet34"](10).parameters()) == 21_345_098
    model = noisy.MODELS["preact_resnet18"](100).eval()
    names = model.state_dict().keys()
    assert "linear2.weight" in names and "head.weight" in names and "layer4.1.conv2.weight" in names
    assert "layer2.0.shortcut.0.weight" in names and not any(n.startswith("bn_final") for n in names)
    logits, embed, pooled = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100) and embed.shape == (2, 128) and pooled.shape == (2, 512)
    assert torch.allclose(embed.norm(dim=1), torch.ones(2), atol=1e-5)


# ---- noise ----------------------------------------------------------------------------------------------------

def test_asymmetric_cifar10_map_and_rate():
    class_map = noisy.asymmetric_class_map("cifar10", 10)
    assert class_map.tolist() == [0, 1, 0, 5, 7, 3, 6, 7, 8, 1]          # 2→0, 3↔5, 4→7, 9→1, others stay
    true = np.repeat(np.arange(10), 5000)
    labels = noisy.make_noisy_labels(true, 10, "asymmetric", 0.4, seed=3, class_map=class_map)
    changed = labels != true
    assert set(zip(true[changed].tolist(), labels[changed].tolist())) == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}
    for c in (2, 3, 4, 5, 9):                                            # each source class flips with p = 0.4
        assert abs(changed[true == c].mean() - 0.4) < 0.03
    report = noisy.noise_report(true, labels, 10)
    assert abs(report["noise_rate"] - 0.2) < 0.01                       # 5 of 10 classes can flip
    assert abs(report["transition_matrix"][3][5] - 0.4) < 0.03 and report["transition_matrix"][0][0] == 1.0
    again = noisy.make_noisy_labels(true, 10, "asymmetric", 0.4, seed=3, class_map=class_map)
    assert (again == labels).all()                                       # seeded


def test_asymmetric_cifar100_stays_within_superclasses(cifar100_dir):
    data = noisy.load_cifar(cifar100_dir, "cifar100")
    fine, coarse = data["train_y"], data["coarse"]
    class_map = noisy.asymmetric_class_map("cifar100", 100, fine, coarse)
    fine_to_coarse = dict(zip(fine.tolist(), coarse.tolist()))
    for superclass in range(20):
        members = sorted(c for c, s in fine_to_coarse.items() if s == superclass)
        assert len(members) == 5
        assert [class_map[c] for c in members] == members[1:] + members[:1]      # j → j+1 circularly
    labels = noisy.make_noisy_labels(fine, 100, "asymmetric", 0.4, seed=0, class_map=class_map)
    changed = labels != fine
    assert all(fine_to_coarse[a] == fine_to_coarse[b] for a, b in zip(fine[changed], labels[changed]))
    assert abs(changed.mean() - 0.4) < 0.01                              # every class flips (no fixed points)


def test_symmetric_noise_resamples_exactly_round_rN_including_the_true_class():
    n, rate = 50_000, 0.2
    # labels outside [0, C) reveal every resampled position: exactly round(r·N) of them
    marked = noisy.make_noisy_labels(np.full(n, -1), 10, "symmetric", rate, seed=0)
    assert (marked != -1).sum() == round(rate * n)
    assert np.bincount(marked[marked != -1], minlength=10).min() > 800   # drawn uniformly from all 10 classes
    true = np.arange(n) % 10
    labels = noisy.make_noisy_labels(true, 10, "symmetric", rate, seed=0)
    flips = (labels != true).sum()
    assert flips < round(rate * n)                                       # some draws hit the true class
    assert abs(flips - rate * n * 9 / 10) < 250                          # flip rate r·(C−1)/C
    assert noisy.make_noisy_labels(true, 10, "none", rate, seed=0).tolist() == true.tolist()


# ---- Sel-CL selection and loss ---------------------------------------------------------------------------------

def test_selection_prefers_clean_labels_on_clustered_embeddings():
    gen = torch.Generator().manual_seed(0)
    num_classes, n = 5, 500
    true = torch.arange(n) % num_classes
    centres = torch.nn.functional.normalize(torch.randn(num_classes, 16, generator=gen), dim=1)
    embed = torch.nn.functional.normalize(centres[true] + 0.1 * torch.randn(n, 16, generator=gen), dim=1)
    labels = torch.from_numpy(noisy.make_noisy_labels(true.numpy(), num_classes, "symmetric", 0.5, seed=1))
    selected, threshold = noisy.select_confident(embed, labels, num_classes, k=30, select_quantile=0.5,
                                                 pair_quantile=0.25)
    clean = labels == true
    assert clean.float().mean() < 0.65 and selected.sum() > 150
    # the per-class budget is the median number of agreeing samples, so classes with fewer clean samples than
    # the median fill it up with their least discrepant noisy ones: purity ~0.93 here, base rate ~0.6
    assert clean[selected].float().mean() > 0.9
    strict, _ = noisy.select_confident(embed, labels, num_classes, k=30, select_quantile=0.0, pair_quantile=0.25)
    assert clean[strict].all() and strict.sum() >= 0.8 * num_classes * (clean.sum() / num_classes).floor() / 1.3
    pairs = noisy.pair_mask({"embed": embed, "selected": selected, "threshold": threshold}, labels, torch.arange(n),
                            torch.arange(n))
    assert (labels[:, None] == labels[None, :])[pairs].all()              # pairs share their noisy label
    same_true = true[:, None] == true[None, :]
    base = same_true[labels[:, None] == labels[None, :]].float().mean()
    assert same_true[pairs].float().mean() > max(0.8, base + 0.3)         # and mostly their true class


def official_masks(graph, index, stored, start, perms):
    """Sel-CL's masks built as the official code does (supervised/unsupervised_masks_estimation): the batch's (2N, 2N)
    and the queue's (2N, M) (its first M entries, as queue.get() returns them), float64."""
    n, eye2 = len(index), torch.eye(2 * len(index), dtype=torch.float64)
    g, g_mem = graph[index][:, index].double(), graph[index][:, stored].double()
    sup = g.clone().fill_diagonal_(0).repeat(2, 2)
    unsup = torch.eye(n, dtype=torch.float64).repeat(2, 2) - eye2
    sup2 = torch.cat([torch.cat([g[perms[0]]] * 2, 1), torch.cat([g[perms[1]]] * 2, 1)]) * (1 - eye2)
    onehot = [(perm[:, None] == torch.arange(n)[None]).double() for perm in perms]
    unsup2 = torch.cat([torch.cat([onehot[0]] * 2, 1), torch.cat([onehot[1]] * 2, 1)]) * (1 - eye2)
    batch = [sup, unsup, sup2, unsup2, 1 - eye2]
    memory = [g_mem.repeat(2, 1), torch.zeros(2 * n, len(stored), dtype=torch.float64),
              torch.cat([g_mem[perms[0]], g_mem[perms[1]]]), torch.zeros(2 * n, len(stored), dtype=torch.float64),
              torch.ones(2 * n, len(stored), dtype=torch.float64)]
    for m, b in zip(memory, batch):
        m[:, start:start + 2 * n] = b
    return batch, memory


def reference_supcon(sim, masks, lams, t=0.1):      # per-anchor loops, float64
    sup, unsup, sup2, unsup2, keep = masks
    n, losses = len(sim) // 2, []
    for r in range(2 * n):
        lam, denominator = lams[r // n], sum(math.exp(sim[r, j] / t) * keep[r, j] for j in range(sim.shape[1]))
        mean = [sum(w[r, j] * (sim[r, j] / t - math.log(denominator)) for j in range(sim.shape[1])) / sum(w[r])
                for w in (sup + unsup, sup2 + unsup2)]
        losses.append(-(lam * mean[0] + (1 - lam) * mean[1]))
    return sum((losses[i] + losses[n + i]) / 2 * (sup[i].sum() > 0) for i in range(n)) / n


def reference_similarity(prob_sim, masks, lams):
    sup, unsup, sup2, unsup2, keep = masks
    n, total = len(prob_sim) // 2, 0.0
    for r in range(2 * n):
        for j in range(prob_sim.shape[1]):
            for w, target in ((lams[r // n], sup + unsup), (1 - lams[r // n], sup2 + unsup2)):
                p, y = float(prob_sim[r, j]), float(target[r, j])
                total += w * keep[r, j] * -(y * math.log(p + 1e-7) + (1 - y) * math.log(1 - p + 1e-7))
    return total / prob_sim.numel()


def test_selcl_masks_and_losses_match_the_official_construction():
    """The masks over batch + supervised queue (this batch's entries at slots 2..7, two older entries, two empty ones),
    the supervised contrastive, similarity and MoCo losses against the official code's construction and per-sample
    float64 loops; a mixup permutation with a fixed point covers the mixed-in image counted in both masks."""
    gen = torch.Generator().manual_seed(3)
    n, d, c = 3, 4, 3
    graph = torch.rand(8, 8, generator=gen) < 0.5
    graph = graph | graph.T | torch.eye(8, dtype=torch.bool)                   # symmetric, self-pairs (official)
    index, perms, lams = torch.tensor([5, 7, 2]), (torch.tensor([0, 2, 1]), torch.tensor([2, 0, 1])), (0.7, 0.6)
    stored = torch.cat([torch.tensor([7, 1]), index, index, torch.tensor([-1, -1])])       # (10,): slot at 2
    embed = torch.nn.functional.normalize(torch.randn(2 * n, d, generator=gen, dtype=torch.float64), dim=1)
    feats = torch.nn.functional.normalize(torch.randn(10, d, generator=gen, dtype=torch.float64), dim=1)
    prob = torch.softmax(torch.randn(2 * n, c, generator=gen, dtype=torch.float64), 1)
    pros = torch.softmax(torch.randn(10, c, generator=gen, dtype=torch.float64), 1)
    feats[-2:], pros[-2:] = -1, -1                                               # empty entries
    batch, memory = official_masks(graph, index, stored[:8], 2, perms)
    ours_batch = noisy.selcl_masks(graph[index][:, index.repeat(2)], torch.arange(2 * n), perms,
                                   torch.ones(2 * n, dtype=torch.bool))
    place = torch.arange(10) - 2
    ours_memory = noisy.selcl_masks(graph[index][:, stored.clamp_min(0)], torch.where(place < 2 * n, place, -1), perms,
                                    stored >= 0)
    for ours, theirs in ((ours_batch, batch), ([m[:, :8] for m in ours_memory], memory)):
        for a, b in zip(ours, theirs):
            assert torch.equal(a.double(), b)
    assert not ours_memory[4][:, 8:].any() and sum(m[:, 8:].sum() for m in ours_memory) == 0   # empty: nothing
    assert (batch[2] * batch[3]).sum() > 0                                      # a column counted in both masks
    for sim, ours, theirs, cols in ((embed @ embed.T, ours_batch, batch, slice(None)),
                                    (embed @ feats.T, ours_memory, memory, slice(0, 8))):
        assert float(noisy.supcon_loss(sim, ours, lams)) == pytest.approx(reference_supcon(sim[:, cols], theirs, lams),
                                                                            rel=1e-5)
    for prob_sim, ours, theirs, cols in ((prob @ prob.T, ours_batch, batch, slice(None)),
                                         (prob @ pros.T, ours_memory, memory, slice(0, 8))):
        columns = int(theirs[4].shape[1])
        assert float(noisy.similarity_loss(prob_sim, ours, lams, columns)) == \
            pytest.approx(reference_similarity(prob_sim[:, cols], theirs, lams), rel=1e-5)
    # an anchor uses MoCo when it has fewer than 2 confident partners, counted as the official sel_mask does
    partners = ours_batch[0][:n].sum(1) + ours_memory[0][:n].sum(1)
    assert partners.tolist() == (batch[0][:n].sum(1) + memory[0][:n].sum(1)).tolist()
    q, k = embed[:n].float(), embed[n:].float()
    keys = torch.randn(5, d, generator=gen)
    expected = [-math.log(math.exp(q[i] @ k[i] / 0.1) / (math.exp(q[i] @ k[i] / 0.1) +
                                                         sum(math.exp(q[i] @ key / 0.1) for key in keys)))
                for i in range(n)]
    assert noisy.moco_loss(q, k, keys).tolist() == pytest.approx(expected, rel=1e-5)


def test_supervised_queue_and_ema_update_match_the_official_rules():
    memory = {"feats": torch.zeros(10, 2), "pros": torch.zeros(10, 3), "index": -torch.ones(10, dtype=torch.long),
              "ptr": 0}
    reference, ptr = [-1] * 10, 0                                 # queue_with_pro.enqueue_dequeue on a list
    for step in range(6):
        index = torch.arange(4) + 10 * step
        start = noisy.enqueue(memory, torch.full((4, 2), float(step)), torch.full((4, 3), float(step)), index)
        if ptr + 4 > 10:
            reference[-4:], ptr, expected_start = index.tolist(), 0, 6
        else:
            reference[ptr:ptr + 4], expected_start, ptr = index.tolist(), ptr, ptr + 4
        assert start == expected_start and memory["ptr"] == ptr and memory["index"].tolist() == reference
        assert (memory["feats"][start:start + 4] == step).all() and (memory["pros"][start:start + 4] == step).all()
    model, ema = noisy.MODELS["preact_resnet18_w8"](4), noisy.MODELS["preact_resnet18_w8"](4)
    before = {k: v.double().clone() for k, v in ema.state_dict().items()}
    noisy.ema_update(ema, model)
    for (name, new), old, p in zip(ema.state_dict().items(), before.values(), model.state_dict().values()):
        is_parameter = name in dict(ema.named_parameters())
        expected = 0.999 * old + 0.001 * p.double() if is_parameter else old      # BatchNorm buffers: untouched
        assert torch.allclose(new.double(), expected, atol=1e-7), name


def test_complex_augmentation_matches_torchvision_on_pil_images():
    """The colour ops and the resized crop against torchvision's functional ops on PIL images (the official pipeline,
    which rounds to uint8 after each op: within 1.5 grey levels), and the crop sizes of RandomResizedCrop's draws."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    images = torch.from_numpy(noisy.synthetic_data(4, 8, 1, size=32)["train_x"])       # (8, 3, 32, 32) uint8
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    as_tensor = lambda imgs: torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1).float() for i in imgs])
    factors = torch.linspace(0.6, 1.4, 8)
    for op, fn, f in [(0, TF.adjust_brightness, factors), (1, TF.adjust_contrast, factors),
                      (2, TF.adjust_saturation, factors), (3, TF.adjust_hue, torch.linspace(-0.1, 0.1, 8))]:
        ours = noisy.colour_op(images.float(), op, f)
        theirs = as_tensor([fn(img, float(v)) for img, v in zip(pil, f)])
        tolerance = 1.5 if op < 3 else 4.0                              # PIL's HSV holds 8-bit hue and saturation
        assert (ours - theirs).abs().mean() < tolerance / 3 and (ours - theirs).abs().max() <= 3 * tolerance, op
    top, left, height, width = (torch.tensor(v, dtype=torch.float) for v in ([0, 5, 3, 10] * 2, [0, 7, 2, 1] * 2,
                                                                              [32, 20, 9, 17] * 2, [32, 11, 26, 5] * 2))
    flip = torch.arange(8) >= 4
    ours = noisy.resized_crop(images, top, left, height, width, flip)
    theirs = as_tensor([(TF.hflip if f else (lambda i: i))(TF.resized_crop(img, int(t), int(l), int(h), int(w),
                                                                           [32, 32]))
                        for img, t, l, h, w, f in zip(pil, top, left, height, width, flip)])
    assert torch.equal(ours[0], images[0].float()) and (ours - theirs).abs().mean() < 1.0
    out = noisy.complex_augment(images.repeat(16, 1, 1, 1), torch.Generator().manual_seed(0))
    assert out.shape == (128, 3, 32, 32) and out.min() >= 0 and out.max() <= 255
    gray = (out.std(1) < 1e-3).all(2).all(1).float().mean()          # grayscale with p 0.2 (a few colour-free images)
    assert 0.05 < gray < 0.4


def test_selection_in_training_keeps_mostly_clean_samples(teacher_run):
    records = read_log(teacher_run)
    assert [r["stage"] for r in records] == [1, 1, 2]
    for r in records:
        assert r["selected"] > 0 and r["selection_precision"] > r["clean_frac_all"] + 0.15
        assert r["selected_frac"] == r["selected"] / 128 and 0 < r["selection_recall"] <= 1 and r["confident_pairs"] > 0
        assert 0 <= r["top1"] <= r["top5"] <= 100 and np.isfinite(r["loss"])
    assert "loss_classif" not in records[0] and "loss_classif" in records[1]    # warm-up: contrast only
    assert records[2]["loss"] == pytest.approx(records[2]["loss_gt"]) and "loss_supervised" not in records[2]
    results = json.load(open(teacher_run / "results.json"))
    assert results["selection_precision"] > 1 - results["noise_rate"] + 0.15 and results["selection_recall"] > 0.5
    noise = json.load(open(teacher_run / "noise.json"))
    labels = np.load(teacher_run / "noisy_labels.npy")
    assert len(labels) == 128 and abs(noise["noise_rate"] - results["noise_rate"]) < 1e-9
    assert np.allclose(np.sum(noise["transition_matrix"], axis=1), 1.0, atol=1e-3)
    stage1 = torch.load(teacher_run / "stage1_model.pt", weights_only=True)          # tensors and plain data only
    assert stage1["selected"].dtype == torch.bool and int(stage1["selected"].sum()) == records[1]["selected"]
    assert torch.equal(stage1["noisy_labels"], torch.from_numpy(labels)) and stage1["epoch"] == 2


# ---- end to end ------------------------------------------------------------------------------------------------

def test_teacher_to_student_adaptconf(teacher_run, tmp_path):
    out = tmp_path / "student"
    results = run(out, "--epochs", "2", "--finetune-epochs", "2", "--label-correction-epoch", "1", "--loss",
                  "adaptconf", "--teacher-ckpt", str(teacher_run / "stage1_model.pt"),
                  "--noisy-labels", str(teacher_run / "noisy_labels.npy"), "--noise-seed", "7")
    assert (np.load(out / "noisy_labels.npy") == np.load(teacher_run / "noisy_labels.npy")).all()
    records = read_log(out)
    stage_two = [r for r in records if r["stage"] == 2]
    assert len(stage_two) == 2
    for r in stage_two:
        assert r["loss_adaptconf"] > 0 and 0 < r["train_beta_mean"] <= 0.5 and 0 <= r["train_beta_frac_half"] <= 1
        assert sum(r["train_beta_hist"]) == pytest.approx(1.0) and len(r["train_beta_hist"]) == 10
        assert r["train_beta_hist"][-1] >= r["train_beta_frac_half"]   # β = 0.5 falls in the last bin
        assert r["loss"] == pytest.approx(r["loss_gt"] + r["loss_adaptconf"], rel=1e-5)
    assert noisy.adaptconf_beta_scale(0, 2) == 1.0                         # int(0.25·3) = 0: no β warm-up left
    assert [noisy.adaptconf_beta_scale(e, 70) for e in (0, 15, 16)] == [1 / 17.75, 16 / 17.75, 1.0]
    assert np.isfinite(results["top1"]) and results["images"] == 63
    assert results["teacher_top1"] == pytest.approx(read_log(teacher_run)[1]["top1"])     # the stage-one teacher


@pytest.mark.parametrize("loss", ["kd", "rkd", "augconf"])
def test_other_losses_from_a_shared_stage_one(teacher_run, tmp_path, monkeypatch, loss):
    """Stage two only; the teacher in train mode (the official code's), with augconf in eval mode (--teacher-mode)."""
    teachers, load_teacher = [], noisy.load_teacher
    monkeypatch.setattr(noisy, "load_teacher", lambda *a: teachers.append(load_teacher(*a)) or teachers[-1])
    mode = ["--teacher-mode", "eval"] if loss == "augconf" else []
    results = run(tmp_path, "--epochs", "2", "--finetune-epochs", "1", "--loss", loss, "--stage1-ckpt",
                  str(teacher_run / "stage1_model.pt"), "--teacher-ckpt", str(teacher_run / "stage1_model.pt"), *mode)
    assert teachers[0].training == (loss != "augconf")
    records = read_log(tmp_path)
    assert [r["epoch"] for r in records] == [2] and records[0]["stage"] == 2 and records[0][f"loss_{loss}"] > 0
    assert results["stage1_top1"] == read_log(teacher_run)[1]["top1"] and np.isfinite(results["top1"])


def test_eval_only_matches_the_logged_accuracy(teacher_run, tmp_path):
    result = noisy.main(noisy.parse_args(TINY + ["--eval-only", str(teacher_run / "checkpoint.pt"),
                                                 "--out", str(tmp_path)]))
    assert result["top1"] == pytest.approx(read_log(teacher_run)[-1]["top1"])
    assert json.load(open(tmp_path / "results.json"))["images"] == 63
    assert "holds a results.json" in refused("--eval-only", teacher_run / "checkpoint.pt", "--out", tmp_path)
    noisy.main(noisy.parse_args(TINY + ["--eval-only", str(teacher_run / "checkpoint.pt"), "--out", str(tmp_path),
                                        "--overwrite"]))


def test_torchrun_two_processes_count_every_test_image_once(teacher_run, tmp_path):
    args = TINY + ["--batch-size", "16", "--epochs", "2", "--finetune-epochs", "1", "--loss", "kd", "--out",
                   str(tmp_path), "--teacher-ckpt", str(teacher_run / "stage1_model.pt")]
    proc = run_torchrun("noisy.py", args)
    assert "global batch 32 (16 × 2)" in proc.stdout
    results = json.load(open(tmp_path / "results.json"))
    assert results["images"] == 63                                       # odd count: no padding, no duplicates
    assert len(read_log(tmp_path)) == 3 and results["selected"] > 0


STAGE_ONE_STEPS = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import noisy
rank, world_size, device = noisy.setup_distributed()
args = noisy.parse_args(sys.argv[3:] + ["--batch-size", str(64 // world_size), "--lr", "0.01"])
data = noisy.load_data(args, rank, world_size, device)
torch.manual_seed(0)
model = noisy.MODELS[args.model](data["num_classes"])
memory, optimizer = noisy.selcl_memory(args, model, 4, device), noisy.make_optimizer(model, 1, args)
records = [noisy.train_one_epoch(args, 1, model, model, None, optimizer, data, None, 0, rank, world_size, 1, memory)]
sums = lambda m: [float(v.double().sum()) for v in m.state_dict().values()]
warm = sums(model)
selection = noisy.reselect(args, model, data, rank, world_size)
records.append(noisy.train_one_epoch(args, 1, model, model, None, optimizer, data, selection, noisy.SUP_QUEUE_FROM,
                                     rank, world_size, 2, memory))
if rank == 0:
    json.dump({"records": records, "warm": warm, "model": sums(model), "ema": sums(memory["ema"]), "keys": float(memory["keys"].double().sum()), "feats": float(memory["feats"].double().sum()),
               "pros": float(memory["pros"].double().sum()), "index": memory["index"].tolist()}, open(sys.argv[2], "w"))
noisy.cleanup_distributed()
"""


def test_torchrun_stage_one_equals_one_process_with_the_same_global_batch(tmp_path):
    """A warm-up step, then two steps with the supervised queue (epoch 4), on 2 processes × 32 and on 1 process × 64:
    the same global batches, augmentations and mixups, the contrast over the gathered batch, BatchNorm over the global
    batch, summed gradients. Every loss, both queues, the EMA encoder and the weights after the warm-up step agree to
    float precision in the first step. The gradients of this tiny network at initialisation are ill-conditioned (a
    1e-7 change of the input moves a BN gradient by 5%), so the last-bit differences of the two ways (PyTorch's BN
    kernel and one sum of gradients against BatchNorm's all-reduced sums and two partial sums) grow step by step:
    measured, first-step losses agree to 2e-7, the Sel-CL step's to 8e-4, weights to 1e-3 after one step and ~1e-1
    of a tensor's sum after three (1 and 2 threads alike). Gradients averaged instead of summed fail (checked)."""
    script = tmp_path / "steps.py"
    script.write_text(STAGE_ONE_STEPS)
    subprocess.run([sys.executable, str(script), ROOT, str(tmp_path / "one.json"), *TINY], check=True, cwd=ROOT)
    run_torchrun(str(script), [ROOT, tmp_path / "two.json", *TINY])
    one, two = (json.load(open(tmp_path / name)) for name in ("one.json", "two.json"))
    assert one["index"] == two["index"] and "loss_supervised" in one["records"][1]
    for a, b, rel in zip(one["records"], two["records"], (1e-6, 3e-3)):
        assert b.get("partners") == a.get("partners")
        for key in a:
            if key.startswith("loss"):
                assert b[key] == pytest.approx(a[key], rel=rel), key
    for key, rtol in (("warm", 3e-3), ("ema", 1e-3), ("keys", 1e-3), ("feats", 1e-3), ("pros", 1e-3)):
        assert np.allclose(two[key], one[key], rtol=rtol, atol=1e-3), key
    assert np.allclose(two["model"], one["model"], rtol=0.3, atol=0.05)


def test_global_batchnorm_equals_pytorchs_in_one_process(tmp_path):
    """noisy.BatchNorm in a process group (here of one process, the sums are then local) against nn.BatchNorm2d:
    output, input/weight/bias gradients and running statistics, in float32 and float64."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
            ours, ref = noisy.BatchNorm(5).to(dtype), torch.nn.BatchNorm2d(5).to(dtype)
            with torch.no_grad():
                for m in (ours, ref):
                    m.weight.copy_(torch.linspace(0.5, 2, 5)), m.bias.copy_(torch.linspace(-1, 1, 5))
            x = (torch.randn(8, 5, 6, 7, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3 + 2)
            xs = [x.clone().requires_grad_() for _ in range(2)]
            outs = [m(v) for m, v in zip((ours, ref), xs)]
            grad = torch.randn_like(outs[0])
            for out in outs:
                out.backward(grad)
            torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
            for a, b in ((xs[0].grad, xs[1].grad), (ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad),
                         (ours.running_mean, ref.running_mean), (ours.running_var, ref.running_var)):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    finally:
        dist.destroy_process_group()


def test_real_cifar_subset_selects_above_the_clean_fraction(cifar100_dir, tmp_path):
    """Real images: 10 CIFAR-100 classes (50 training, 10 test images each) in CIFAR-10's pickle layout, 40% symmetric
    noise; after the warm-up epoch (MoCo with the EMA encoder and complex augmentation) the kNN selection's precision
    is well above the fraction of clean labels (measured: 0.75 and 0.73 against 0.62 with seeds 1 and 2)."""
    real = noisy.load_cifar(cifar100_dir, "cifar100")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def take(x, y, per):
        index = np.random.default_rng(0).permutation(np.concatenate([np.nonzero(y == c)[0][:per] for c in range(10)]))
        return x[index].reshape(-1, 3072), y[index].tolist()
    train, test = take(real["train_x"], real["train_y"], 50), take(real["test_x"], real["test_y"], 10)
    for i in range(5):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": train[0][100 * i:100 * i + 100], "labels": train[1][100 * i:100 * i + 100]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test[0], "labels": test[1]}, f)
    results = noisy.main(noisy.parse_args(
        ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--noise-rate", "0.4", "--model", "preact_resnet18_w8",
         "--batch-size", "50", "--epochs", "1", "--finetune-epochs", "0", "--knn-k", "20", "--warmup-epochs", "0"]))
    assert results["clean_frac_all"] == pytest.approx(1 - results["noise_rate"]) and results["clean_frac_all"] < 0.65
    assert results["selection_precision"] > results["clean_frac_all"] + 0.05 and results["selected"] >= 50


class Killed(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run(teacher_run, tmp_path, monkeypatch, capsys):
    """Killed after its first epoch (a log line written after the checkpoint, a cut-off line, a stale temporary file),
    resumed with a longer stage one (--epochs 1 → 2: allowed while in stage one), crossing into stage two: it ends
    where the uninterrupted teacher run ends; every file we write loads with weights_only=True."""
    straight, interrupted = teacher_run, tmp_path / "interrupted"           # the teacher ran --epochs 2, 1 fine-tuning
    end_epoch = noisy.end_epoch

    def killed_in_epoch_1(args, stage, epoch, *rest):                     # after epoch 0's log line and checkpoint
        if epoch == 1:
            raise Killed
        return end_epoch(args, stage, epoch, *rest)
    with monkeypatch.context() as m:
        m.setattr(noisy, "end_epoch", killed_in_epoch_1)
        with pytest.raises(Killed):
            run(interrupted, "--epochs", "1", "--finetune-epochs", "1")
    with open(interrupted / "log.jsonl", "a") as f:     # epoch 1's line, then one cut off: both dropped on resume
        f.write(json.dumps({"epoch": 1, "stage": 2}) + '\n{"epoch": 1, "st')
    (interrupted / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    run(interrupted, "--epochs", "2", "--finetune-epochs", "1", "--resume")
    printed = capsys.readouterr().out
    assert "resuming" in printed and "after epoch 1" in printed and "warning: --epochs 2 (was 1)" in printed
    assert not [name for name in os.listdir(interrupted) if name.endswith(".tmp")]
    for name in ("checkpoint.pt", "stage1_model.pt"):
        a, b = (torch.load(folder / name, weights_only=True) for folder in (straight, interrupted))
        assert a["epoch"] == b["epoch"] == (3 if name == "checkpoint.pt" else 2)
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)
    assert torch.equal(a["noisy_labels"], b["noisy_labels"]) and torch.equal(a["selected"], b["selected"])
    assert [r["epoch"] for r in read_log(interrupted)] == [0, 1, 2]
    assert read_log(interrupted)[-1]["loss"] == read_log(straight)[-1]["loss"]
    message = refused("--epochs", 3, "--finetune-epochs", 1, "--out", interrupted, "--resume")   # in stage two now
    assert "has done 3 epochs with --epochs 2" in message and "pass --epochs 2" in message


def test_out_holds_one_run_and_resume_needs_the_same_arguments(teacher_run, tmp_path, capsys):
    out, short = tmp_path / "run", ["--epochs", "1", "--finetune-epochs", "0"]
    out.mkdir()
    run(out, *short, "--resume")                                          # --resume on an empty folder: afresh
    assert "(--resume found no checkpoint)" in capsys.readouterr().out and len(read_log(out)) == 1
    assert "holds a run (checkpoint.pt, log.jsonl, results.json); pass --resume" in refused(*short, "--out", out)
    run(out, *short, "--overwrite")
    assert [r["epoch"] for r in read_log(out)] == [0]                    # one run's lines, not two
    message = refused(*short, "--out", out, "--resume", "--lr", "0.05", "--seed", "2")
    assert "--lr (0.1 there, 0.05 now), --seed (1 there, 2 now)" in message
    assert "pass --out" in refused(*short, "--resume")
    (tmp_path / "file").write_text("")
    for extra in ([], ["--benchmark", 1], ["--eval-only", teacher_run / "checkpoint.pt"]):
        assert f"--out {tmp_path / 'file'} is a file" in refused(*short, "--out", tmp_path / "file", *extra)


# ---- errors ----------------------------------------------------------------------------------------------------

def test_bad_numbers_are_refused_naming_their_flag():
    for argv, message in [(["--epochs", 0], "--epochs must be > 0"), (["--epochs", -1], "--epochs must be > 0"),
                          (["--batch-size", 0], "--batch-size must be > 0"), (["--batch-size", 1], "at least 2"),
                          (["--tau", 0], "--tau must be > 0"), (["--tau", -1], "--tau must be > 0"),
                          (["--tau", "nan"], "--tau must be > 0 and finite, got nan"), (["--lr", 0], "--lr must be"),
                          (["--finetune-lr", "inf"], "--finetune-lr"), (["--kd-T", 0], "--kd-T must be > 0"),
                          (["--noise-rate", 1.5], "--noise-rate must be in [0, 1]"), (["--knn-k", 0], "--knn-k"),
                          (["--milestones", 5, -1], "--milestones must be >= 0"),
                          (["--label-correction-epoch", -1], "--label-correction-epoch must be >= 0"),
                          (["--epochs", 3, "--warmup-epochs", 3], "--warmup-epochs 3 must be below --epochs 3"),
                          (["--loss", "kd"], "--teacher-ckpt"), (["--gt-weight", 0], "nothing to learn"),
                          (["--model", "resnet50"], "invalid choice")]:
        assert message in refused(*argv), argv


def test_bad_files_stop_with_one_line_naming_flag_and_file(teacher_run, tmp_path):
    good = (teacher_run / "stage1_model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[:len(good) // 2])
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    old = torch.load(teacher_run / "stage1_model.pt", weights_only=True)
    torch.save({**old, "noisy_labels": old["noisy_labels"].numpy()}, tmp_path / "numpy_labels.pt")   # numpy: no
    for flag, extra in [("--teacher-ckpt", ["--loss", "kd"]), ("--eval-only", []), ("--stage1-ckpt", [])]:
        for name in ("truncated.pt", "random.pt", "numpy_labels.pt"):
            message = refused(*extra, "--epochs", 2, flag, tmp_path / name)
            assert f"{flag} {tmp_path / name} is not a readable weights-only PyTorch checkpoint" in message
        assert f"{flag} {tmp_path} is a folder" in refused(*extra, "--epochs", 2, flag, tmp_path)
        assert "missing.pt is missing" in refused(*extra, "--epochs", 2, flag, tmp_path / "missing.pt")
    assert "cifar-100-python not found; pass --data-dir" in refused("--dataset", "cifar100", "--data-dir", tmp_path)
    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / name).write_bytes(b"not a pickle")
    assert "not a CIFAR python pickle" in refused("--dataset", "cifar10", "--data-dir", tmp_path)
    state = torch.load(teacher_run / "stage1_model.pt", weights_only=True)
    state["model"]["linear2.weight"] = torch.zeros(7, 64)
    torch.save(state, tmp_path / "wrong_classes.pt")
    assert "'linear2.weight' has shape (7, 64) in the checkpoint but (4, 64)" in \
        refused("--loss", "kd", "--teacher-ckpt", tmp_path / "wrong_classes.pt")
    np.save(tmp_path / "short.npy", np.zeros(10, dtype=np.int64))
    assert "another data set" in refused("--noisy-labels", tmp_path / "short.npy")
    assert "--noisy-labels" in refused("--noisy-labels", tmp_path / "random.pt")          # not a .npy
    stage1 = ["--epochs", 2, "--stage1-ckpt", teacher_run / "stage1_model.pt"]
    assert "no selection for these noisy labels" in refused(*stage1, "--noise-seed", 3)    # other noise seed
    assert "was trained on other noisy labels than this run's" in refused(
        "--loss", "kd", "--teacher-ckpt", teacher_run / "stage1_model.pt", "--noise-seed", 3)
    assert "ended stage one after 2 epochs; pass --epochs 2" in refused(*stage1[2:], "--epochs", 5)
    state = torch.load(teacher_run / "stage1_model.pt", weights_only=True)
    state["selected"][:] = False
    torch.save(state, tmp_path / "nothing_selected.pt")
    assert "0 confident examples of stage one" in refused(*stage1[:3], tmp_path / "nothing_selected.pt")
    assert "128 training images over 1 process(es) do not fill one batch of 256" in \
        refused("--epochs", 1, "--finetune-epochs", 0, "--batch-size", 256)


def test_an_empty_checkpoint_is_one_line_naming_flag_and_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    for flag, extra in [("--teacher-ckpt", ["--loss", "kd"]), ("--eval-only", []), ("--stage1-ckpt", [])]:
        message = refused(*extra, "--epochs", 2, flag, tmp_path / "empty.pt")
        assert f"{flag} {tmp_path / 'empty.pt'} is not a readable weights-only PyTorch checkpoint" in message


def test_progress_lines_inside_an_epoch(monkeypatch, capsys):
    """Progress is wired into the training step (every=0 here: a line after every step but the last)."""
    progress = noisy.Progress
    monkeypatch.setattr(noisy, "Progress", lambda *a: progress(*a, every=0.0))
    args = noisy.parse_args(TINY + ["--batch-size", "8", "--epochs", "3", "--finetune-epochs", "2"])
    data = noisy.load_data(args, 0, 1, torch.device("cpu"))
    model = noisy.MODELS[args.model](data["num_classes"])
    noisy.train_one_epoch(args, 1, model, model, None, noisy.make_optimizer(model, 1, args), data, None, 1, 0, 1,
                          max_steps=3)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  step")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3"] and "images/s" in lines[0] and "the run in" in lines[0]


def test_benchmark_times_both_stages(teacher_run, tmp_path, capsys):
    """The ordinary loops on generated images of CIFAR's shape; without --teacher-ckpt a random teacher."""
    for extra in (["--teacher-ckpt", str(teacher_run / "stage1_model.pt")], []):
        result = noisy.main(noisy.parse_args(TINY + ["--benchmark", "1", "--batch-size", "8", "--loss", "adaptconf",
                                                     "--out", str(tmp_path), *extra]))
        printed = capsys.readouterr().out
        assert "benchmark stage one (Sel-CL)" in printed and "benchmark stage two (Sel-CL+)" in printed
        assert "images/s" in printed and result["images_per_s"] > 0 and result["stage2_ms_per_step"] > 0
    assert json.load(open(tmp_path / "benchmark.json"))["batch_size"] == 8
    assert not os.path.exists(tmp_path / "log.jsonl")                   # a benchmark trains nothing for real


def test_cifar10_pickles_and_asymmetric_noise_end_to_end(tmp_path):
    """A miniature CIFAR-10 in the standard pickle layout: the loader, the asymmetric map and a short run."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = noisy.synthetic_data(10, 200, 30, size=32)                 # learnable colour/stripe classes
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        x, y = (images["train_x"][40 * i:40 * i + 40], images["train_y"][40 * i:40 * i + 40]) if i < 5 else \
            (images["test_x"], images["test_y"])
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x.reshape(len(x), 3072), "labels": y.tolist()}, f)
    data = noisy.load_cifar(str(tmp_path), "cifar10")
    assert data["train_x"].shape == (200, 3, 32, 32) and data["test_y"].shape == (30,)
    out = tmp_path / "run"
    noisy.main(noisy.parse_args(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--noise-type", "asymmetric",
                                 "--noise-rate", "0.4", "--model", "preact_resnet18_w8", "--batch-size", "50",
                                 "--epochs", "1", "--finetune-epochs", "0", "--knn-k", "10", "--warmup-epochs", "0",
                                 "--out", str(out)]))
    noise = json.load(open(out / "noise.json"))
    matrix = np.array(noise["transition_matrix"])
    off_diagonal = {(i, j) for i, j in zip(*np.nonzero(matrix)) if i != j}
    assert off_diagonal and off_diagonal <= {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}
    record = read_log(out)[0]
    assert record["selected"] > 0 and 0 <= record["top1"] <= record["top5"] <= 100


@pytest.mark.parametrize("loss", ["ce", "kd", "rkd", "augconf", "adaptconf"])
def test_training_steps_make_no_host_sync_and_no_host_copy(loss, monkeypatch):
    """Both stages' steps (--benchmark runs the ordinary loop) and the warm-up epoch's: no host sync, no tensor made
    from host data. Counting syncs stands in for torch.cuda.set_sync_debug_mode, which reports nothing on the CPU."""
    made, copies = collections.Counter(), {}
    for module, name in [(torch, "tensor"), (torch, "as_tensor"), (torch, "from_numpy"), (torch.Tensor, "to")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: made.update([_n]) or _f(*a, **k))

    def benchmark(steps):                       # 5 untimed + `steps` timed steps of each stage
        made.clear()
        noisy.main(noisy.parse_args(TINY + ["--benchmark", str(steps), "--batch-size", "4", "--loss", loss]))
        copies[steps] = dict(made)
    assert syncs_per_step(benchmark) == {} and copies[1] == copies[3]
    args = noisy.parse_args(TINY + ["--batch-size", "4"])
    data = noisy.load_data(args, 0, 1, torch.device("cpu"))
    model = noisy.MODELS[args.model](data["num_classes"])
    optimizer = noisy.make_optimizer(model, 1, args)
    assert syncs_per_step(lambda steps: noisy.train_one_epoch(args, 1, model, model, None, optimizer, data, None, 0, 0,
                                                              1, max_steps=steps)) == {}     # instance contrast


def test_stage_one_model_is_written_before_the_checkpoint_that_skips_it(tmp_path, monkeypatch):
    """A run killed between the two writes resumes in stage two: stage1_model.pt (the students' teacher) must exist."""
    written = []
    save = noisy.save_atomic
    monkeypatch.setattr(noisy, "save_atomic", lambda obj, path: written.append(os.path.basename(path)) or
                        save(obj, path))
    run(tmp_path, "--epochs", "1", "--finetune-epochs", "0")
    assert written == ["stage1_model.pt", "checkpoint.pt"]


def test_a_global_batch_larger_than_the_queues_is_one_line():
    """A step enqueues 2 entries per image into the supervised queue of 100·C·2 (800 for the 4 synthetic classes)."""
    with pytest.raises(SystemExit, match="--batch-size: the global batch 512 does not fit .* at most 400"):
        noisy.main(noisy.parse_args([*TINY[:-8], "--batch-size", "512", "--epochs", "1", "--warmup-epochs", "0"]))
