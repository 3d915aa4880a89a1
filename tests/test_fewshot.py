"""Tests of fewshot.py (Meta-Baseline weak-to-strong, Tables 5 and 6): backbones, episodes, the prototype classifier,
the confidence interval, both stages end to end on a tiny generated miniImageNet, DDP, --out/--resume and bad inputs
(each a one-line UserError naming its flag or file)."""
import functools
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import fewshot
from conftest import make_image_tree, run_torchrun, syncs_per_step

TINY = ["--width", "4", "--image-size", "16", "--query", "3", "--val-episodes", "20", "--test-episodes", "40"]


def write_pickles(root, classes=(8, 5, 5), per_class=(12, 8, 8), size=20, seed=0):
    """Tiny miniImageNet pickles (train_phase_train, val, test; labels offset per split as in the real files). Each
    class has its own colour and stripe pattern, so a prototype classifier can tell the classes apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    offset = 0
    for name, n_classes, n in zip(("train_phase_train", "val", "test"), classes, per_class):
        data, labels = [], []
        for k in range(n_classes):
            c = offset + k
            colour = np.array([(97 * c) % 256, (53 * c + 80) % 256, (181 * c + 40) % 256], dtype=np.float32)
            stripes = np.sin((xx if c % 2 else yy) * (0.4 + 0.15 * (c % 7)))[..., None] * 60
            for _ in range(n):
                data.append(np.clip(colour + stripes + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8))
                labels.append(c)
        offset += n_classes
        with open(os.path.join(root, f"miniImageNet_category_split_{name}.pickle"), "wb") as f:
            pickle.dump({"data": np.stack(data), "labels": labels}, f)
    return str(root)


def run(data_dir, out, *extra):
    return fewshot.main(fewshot.parse_args(["--data-dir", data_dir, "--out", str(out), *TINY, *map(str, extra)]))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def parse_error(*argv):
    """parse_args stops with a one-line UserError before any data is read; returns its message."""
    with pytest.raises(fewshot.UserError) as excinfo:
        fewshot.parse_args(list(map(str, argv)))
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def user_error(data_dir, out, *extra):
    """A run that stops with one UserError line; returns it."""
    with pytest.raises(fewshot.UserError) as excinfo:
        run(data_dir, out, *extra)
    assert "\n" not in str(excinfo.value) and str(excinfo.value).split(": ")[1] == "error"
    return str(excinfo.value)


SHOTS = ("1shot", "1shot_ci", "5shot", "5shot_ci")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_pickles(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def teacher_ckpt(data_dir, tmp_path_factory):
    """A classifier-stage ResNet-12 teacher trained with ce (2 epochs)."""
    out = tmp_path_factory.mktemp("teacher")
    run(data_dir, out, "--stage", "classifier", "--model", "resnet12", "--loss", "ce", "--epochs", "2",
        "--batch-size", "48")
    return str(out / "checkpoint.pt")


# ---- models ------------------------------------------------------------------------------------------------------

def test_parameter_counts_match_the_official_backbones():
    counts = {name: sum(p.numel() for p in build(64).parameters()) for name, build in fewshot.MODELS.items()}
    assert counts == {"resnet12": 7_996_800, "resnet18": 10_210_944, "resnet36": 23_159_040}
    assert fewshot.MODELS["resnet12"](64).out_dim == 512
    # Meta-Baseline's names: ResNet-12 stages are single blocks, deeper ones nn.Sequential
    assert "layer1.conv1.weight" in fewshot.MODELS["resnet12"](4).state_dict()
    assert "layer3.4.conv3.weight" in fewshot.MODELS["resnet36"](4).state_dict()
    assert fewshot.MODELS["resnet36"](4)(torch.randn(2, 3, 16, 16)).shape == (2, 32)


# ---- episodes, prototype classifier, confidence interval -------------------------------------------------------------

def test_episodes_have_way_classes_and_distinct_support_and_query_images():
    labels = torch.arange(12).repeat_interleave(25)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    per_class = fewshot.images_by_class(labels)
    rng = np.random.default_rng(0)
    for shot in (1, 5):
        for _ in range(50):
            episode = fewshot.sample_episode(rng, per_class, 5, shot, 15)
            assert episode.shape == (5, shot + 15)
            classes = labels[torch.from_numpy(episode)]
            assert (classes == classes[:, :1]).all()                       # each row is one class
            assert len(set(classes[:, 0].tolist())) == 5                   # exactly 5 distinct classes
            assert len(set(episode.reshape(-1).tolist())) == 5 * (shot + 15)   # no image twice, so no overlap
            support, query = set(episode[:, :shot].reshape(-1)), set(episode[:, shot:].reshape(-1))
            assert not support & query
    a = fewshot.sample_episode(np.random.default_rng([0, 7]), per_class, 5, 1, 15)
    assert (a == fewshot.sample_episode(np.random.default_rng([0, 7]), per_class, 5, 1, 15)).all()


def test_prototype_classifier_is_perfect_on_separable_features_and_chance_on_noise():
    labels = torch.arange(10).repeat_interleave(20)
    per_class = fewshot.images_by_class(labels)
    separable = torch.nn.functional.one_hot(labels, 10).float() * 5 + 0.3 * torch.randn(200, 10)
    accs = fewshot.episode_accuracies(separable, per_class, 5, 1, 15, 100, 0, 0, 1)
    assert accs.shape == (100,) and (accs == 1).all()
    noise = torch.randn(200, 10)
    assert fewshot.episode_accuracies(noise, per_class, 5, 1, 15, 200, 0, 0, 1).mean() < 0.4
    # the logits: scale · cosine to the class-mean prototype
    support, query = torch.randn(2, 3, 4, 8), torch.randn(2, 6, 8)
    logits = fewshot.prototype_logits(support, query, 10.0)
    proto = support.mean(dim=2)
    expected = 10 * torch.nn.functional.cosine_similarity(query[:, :, None], proto[:, None], dim=-1)
    torch.testing.assert_close(logits, expected)


def test_episode_accuracies_split_over_ranks_equal_the_single_process_ones():
    """The DDP path scores episodes rank::world and sums; simulated here by summing each rank's share."""
    labels = torch.arange(6).repeat_interleave(20)
    features = torch.randn(120, 16)
    per_class = fewshot.images_by_class(labels)
    whole = fewshot.episode_accuracies(features, per_class, 5, 5, 15, 37, 3, 0, 1)
    parts = [fewshot.episode_accuracies(features, per_class, 5, 5, 15, 37, 3, r, 3) for r in range(3)]
    assert torch.equal(sum(parts), whole)
    assert all((p != 0).sum() <= 13 for p in parts)


def test_adaptconf_beta_warm_up_is_the_first_quarter_of_epochs():
    """The official utils adapt_conf_loss / aug_conf_loss, epochs counted from 1: e / (0.25·E) while e < int(0.25·E)
    (our epoch 0 is its epoch 1), listed here for E = 20 (meta stage), 10 and 2, and E = 100 (classifier stage)."""
    scales = lambda *argv: [fewshot.beta_scale(fewshot.parse_args(list(argv)), e) for e in range(int(argv[-1]))]
    assert scales("--stage", "meta", "--init", "cls.pt", "--epochs", "20") == [0.2, 0.4, 0.6, 0.8] + [1.0] * 16
    assert scales("--epochs", "10") == [0.4] + [1.0] * 9           # int(2.5) = 2: one ramp epoch, then a jump
    assert scales("--epochs", "2") == [1.0, 1.0]                    # int(0.5) = 0: no warm-up
    assert scales("--epochs", "100") == [e / 25 for e in range(1, 25)] + [1.0] * 76
    # AugConf's α ramps the same way up to --alpha-max (the official aug_conf_loss)
    args = fewshot.parse_args(["--stage", "meta", "--init", "cls.pt", "--loss", "augconf", "--teacher", "resnet12",
                               "--teacher-ckpt", "t.pt", "--epochs", "20"])
    s_logits, t_logits, labels = torch.randn(6, 5), torch.randn(6, 5), torch.arange(6) % 5
    term = fewshot.loss_terms(args, 1, (s_logits, None), (t_logits, None), labels)["augconf"]
    assert term == fewshot.common.augconf_loss(s_logits, t_logits, 0.5 * 0.4, T=10.0)
    args = fewshot.parse_args(["--stage", "meta", "--epochs", "20", "--init", "cls.pt"])
    assert (args.lr, args.tau, args.kd_T, args.lr_decay_epoch) == (1e-3, 0.25, 10.0, None)
    assert fewshot.lr_at(args, 19) == 1e-3                                 # meta stage: no decay
    args = fewshot.parse_args([])
    assert (args.stage, args.epochs, args.lr, args.tau, args.lr_decay_epoch, args.batch_size) == \
        ("classifier", 100, 0.1, 8.0, None, 128)
    assert fewshot.lr_at(args, 89) == 0.1 and fewshot.lr_at(args, 90) == pytest.approx(0.01)   # 0.9·epochs
    args = fewshot.parse_args(["--epochs", "200"])                         # the default follows --epochs, so a
    assert fewshot.lr_at(args, 179) == 0.1 and fewshot.lr_at(args, 180) == pytest.approx(0.01)   # resume may extend


def test_confidence_interval_matches_its_formula():
    accs = [0.2, 0.4, 0.6, 0.8, 1.0]
    mean, ci = fewshot.mean_ci(accs)
    std = math.sqrt(sum((a - 0.6) ** 2 for a in accs) / 4)
    assert mean == pytest.approx(60.0)
    assert ci == pytest.approx(100 * 1.96 * std / math.sqrt(5))
    assert fewshot.mean_ci([0.5] * 10) == (pytest.approx(50.0), 0.0)


# ---- both stages end to end ----------------------------------------------------------------------------------------

def test_classifier_stage_then_meta_stage_then_evaluation(data_dir, teacher_ckpt, tmp_path):
    # Table 5: the ResNet-36 student learns from the classifier-stage ResNet-12 teacher with AdaptConf
    student = tmp_path / "student"
    res = run(data_dir, student, "--stage", "classifier", "--model", "resnet36", "--loss", "adaptconf",
              "--teacher", "resnet12", "--teacher-ckpt", teacher_ckpt, "--epochs", "2", "--batch-size", "48")
    log = read_log(student)
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[0]["train_beta_scale"] == log[1]["train_beta_scale"] == 1.0   # int(0.25 · 2) = 0: no warm-up
    assert 0 < log[1]["train_beta_mean"] <= 0.5 and 0 <= log[1]["train_beta_frac_half"] <= 1
    assert len(log[1]["train_beta_hist"]) == 10 and sum(log[1]["train_beta_hist"]) == pytest.approx(1.0)
    assert log[0]["lr"] == 0.1 and log[1]["lr"] == pytest.approx(0.01)   # x0.1 at 0.9·epochs
    assert log[1]["loss_adaptconf"] > 0 and log[1]["images"] == 20 * 5 * 3   # val: 20 episodes of 5 × 3 queries
    assert log[1]["top1"] == log[1]["1shot"] and set(SHOTS) <= set(log[1])
    saved = json.loads((student / "results.json").read_text())
    assert saved["5shot"] == pytest.approx(res["5shot"]) and saved["split"] == "test"
    assert res["top1"] == res["1shot"] and res["images"] == 40 * 5 * 3   # test: 40 episodes per shot
    assert res["best_epoch"] in (0, 1) and log[res["best_epoch"]]["top1"] == res["best_top1"]
    # the teacher, scored on the same test episodes, as its own evaluation scores it
    alone = run(data_dir, tmp_path / "teacher_eval", "--model", "resnet12", "--eval-only", teacher_ckpt)
    assert res["teacher_top1"] == pytest.approx(alone["top1"])
    # classes differ in colour, so features separate them: wrong episode labels would give 20%
    assert res["5shot"] > 50 and res["1shot_ci"] >= 0

    # Table 6: meta stage from the student's classifier-stage encoder, classifier-stage teacher
    meta = tmp_path / "meta"
    res = run(data_dir, meta, "--stage", "meta", "--model", "resnet36", "--init", student / "checkpoint.pt",
              "--loss", "adaptconf", "--teacher", "resnet12", "--teacher-ckpt", teacher_ckpt, "--epochs", "2",
              "--batches-per-epoch", "2", "--episodes-per-batch", "2")
    log = read_log(meta)
    assert log[0]["lr"] == 1e-3 and log[1]["lr"] == 1e-3
    # Table 6 reports val at the best epoch; the log also holds the test split's 20 episodes of every epoch
    best = log[res["best_epoch"]]
    assert [res[f"best_val_{k}"] for k in SHOTS] == [best[k] for k in SHOTS] and res["best_top1"] == best["1shot"]
    assert all(f"test_{k}" in r for r in log for k in SHOTS) and best["test_images"] == 20 * 5 * 3
    assert log[0]["scale"] != 10.0                                          # the scale is learned
    assert res["1shot"] > 40 and res["best_epoch"] in (0, 1)
    ckpt = torch.load(meta / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "scale" in ckpt["model"] and "head.weight" not in ckpt["model"]
    # the encoder really came from the classifier stage: untrained, the first BN's running mean would be 0
    init = torch.load(student / "checkpoint.pt", weights_only=True)["model"]
    assert init["encoder.layer1.0.bn1.running_mean"].abs().sum() > 0

    # a meta-stage teacher (Table 6, right half), kd loss
    res = run(data_dir, tmp_path / "meta2", "--stage", "meta", "--model", "resnet36", "--init",
              student / "checkpoint.pt", "--loss", "kd", "--teacher", "resnet36", "--teacher-ckpt",
              meta / "checkpoint.pt", "--epochs", "1", "--batches-per-epoch", "2", "--episodes-per-batch", "1")
    assert read_log(tmp_path / "meta2")[0]["loss_kd"] > 0

    # evaluation only, of either stage's checkpoint
    res = run(data_dir, tmp_path / "eval", "--model", "resnet36", "--eval-only", meta / "checkpoint.pt")
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {k: again[k] for k in SHOTS} == pytest.approx({k: res[k] for k in SHOTS})
    assert res["top1"] == res["1shot"] and res["images"] == 40 * 5 * 3 and res["split"] == "test"


@pytest.mark.parametrize("shot, best_epoch", [(1, 1), (5, 0)])
def test_best_epoch_is_chosen_on_val_at_the_training_shot(data_dir, teacher_ckpt, tmp_path, monkeypatch, shot,
                                                          best_epoch):
    """As Meta-Baseline's train_meta.py: a 5-shot run keeps the epoch of the best 5-shot val accuracy (the tiny data
    set is too easy to tell the shots apart, so evaluate returns set accuracies: val 1-shot rises, 5-shot falls)."""
    val = iter([(50.0, 70.0), (41.0, 46.0), (60.0, 65.0), (41.0, 46.0)])   # each epoch: val, then test's log entry

    def evaluate(args, encoder, split, episodes, rank, world_size, device):
        one, five = next(val) if episodes == args.val_episodes else (40.0, 45.0)
        return {"top1": one, "1shot": one, "1shot_ci": 0.0, "5shot": five, "5shot_ci": 0.0, "images": 1}

    monkeypatch.setattr(fewshot, "evaluate", evaluate)
    res = run(data_dir, tmp_path, "--stage", "meta", "--model", "resnet12", "--init", teacher_ckpt, "--shot", shot,
              "--epochs", "2", "--batches-per-epoch", "1", "--episodes-per-batch", "1")
    log = read_log(tmp_path)
    assert [r["top1"] for r in log] == [r[f"{shot}shot"] for r in log]
    assert res["best_epoch"] == best_epoch and res["best_top1"] == log[best_epoch][f"{shot}shot"]
    assert res["best_val_1shot"] == log[best_epoch]["1shot"] and [r["test_1shot"] for r in log] == [41.0, 41.0]
    assert res["top1"] == res["1shot"] == 40.0                              # the test headline stays 1-shot


def meta_checkpoint(path, scale=3.0):
    """A meta-stage ResNet-12 (width 4) checkpoint with a learned scale other than 10."""
    torch.manual_seed(5)
    model = fewshot.MetaBaseline(fewshot.MODELS["resnet12"](4))
    with torch.no_grad():
        model.scale.fill_(scale)
    torch.save({"model": model.state_dict()}, path)
    return model


def test_meta_stage_teacher_is_frozen_with_its_own_prototype_classifier_of_scale_10(tmp_path):
    saved = meta_checkpoint(tmp_path / "meta.pt")
    args = fewshot.parse_args(["--stage", "meta", "--init", "x.pt", "--model", "resnet12", "--width", "4", "--query",
                               "3", "--episodes-per-batch", "2", "--loss", "kd", "--teacher", "resnet12",
                               "--teacher-ckpt", str(tmp_path / "meta.pt")])
    teacher = fewshot.load_teacher(args, 5, torch.device("cpu"))
    assert teacher.scale.item() == 10.0 and not teacher.training and not any(p.requires_grad
                                                                             for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in saved.state_dict().items() if k != "scale")
    labels = torch.arange(5).repeat_interleave(8)
    train = (torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8), labels, fewshot.images_by_class(labels))
    torch.manual_seed(0)
    student = fewshot.MetaBaseline(fewshot.MODELS["resnet12"](4))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    fewshot.train_one_epoch(args, student, teacher, optimizer, train, 0, 0, 1, torch.device("cpu"), max_steps=2)
    assert not teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("loss", ["kd", "rkd", "augconf"])
def test_other_losses_train(data_dir, teacher_ckpt, tmp_path, loss):
    run(data_dir, tmp_path, "--stage", "classifier", "--model", "resnet12", "--loss", loss, "--teacher",
        "resnet12", "--teacher-ckpt", teacher_ckpt, "--epochs", "1", "--batch-size", "48", "--test-episodes", "10")
    record = read_log(tmp_path)[0]
    assert record[f"loss_{loss}"] > 0
    assert record["loss"] == pytest.approx(record["loss_gt"] + record[f"loss_{loss}"], rel=1e-5)


def test_image_folder_layout(tmp_path):
    root = make_image_tree(str(tmp_path / "tree"), splits=("train", "val", "test"), num_classes=5, per_class=8,
                           size=20)
    images, labels, per_class = fewshot.load_split(root, "val", 16)
    assert images.shape == (40, 3, 16, 16) and images.dtype == torch.uint8 and labels.tolist() == sorted(labels)
    assert [len(c) for c in per_class] == [8] * 5
    res = run(root, tmp_path / "out", "--stage", "classifier", "--model", "resnet12", "--epochs", "1",
              "--batch-size", "16")
    assert 0 <= res["1shot"] <= 100


def test_pickles_are_resized_and_relabelled(data_dir):
    images, labels, _ = fewshot.load_split(data_dir, "test", 16)
    assert images.shape == (40, 3, 16, 16) and labels.min() == 0 and labels.max() == 4


# ---- run contract: resume, DDP, benchmark --------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["classifier", "meta"])
def test_resume_reproduces_an_uninterrupted_run(data_dir, teacher_ckpt, tmp_path, capsys, stage):
    """One command line for the first launch and every restart: --resume on a new folder starts afresh; a resume
    drops a cut-off last log line and a stale temporary file, and ends where the uninterrupted run ends. Our
    checkpoints load with weights_only=True."""
    args = ["--stage", stage, "--model", "resnet12", "--loss", "adaptconf", "--teacher", "resnet12",
            "--teacher-ckpt", teacher_ckpt, "--epochs", "2", "--batch-size", "48", "--batches-per-epoch", "2",
            "--episodes-per-batch", "1", "--test-episodes", "10", "--lr-decay-epoch", "1"]   # schedule of 2 epochs
    if stage == "meta":
        args += ["--init", teacher_ckpt]
    run(data_dir, tmp_path / "full", *args, "--resume")
    assert "(--resume found no checkpoint)" in capsys.readouterr().out
    interrupted = [a if a != "2" or args[i - 1] != "--epochs" else "1" for i, a in enumerate(args)]
    part = tmp_path / "part"
    run(data_dir, part, *interrupted)
    with open(part / "log.jsonl", "a") as f:
        f.write('{"epoch": 1, "lr": 0.0')                                # killed mid-write
    (part / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")        # killed mid-save
    run(data_dir, part, *args, "--resume")
    assert "resuming" in capsys.readouterr().out and not (part / "checkpoint.pt.tmp").exists()
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(part / "checkpoint.pt", weights_only=True)
    assert full["epoch"] == resumed["epoch"] == 2 and {**full["args"], "out": None} == {**resumed["args"], "out": None}
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert [r["epoch"] for r in read_log(part)] == [0, 1]
    assert read_log(part)[1]["loss"] == read_log(tmp_path / "full")[1]["loss"]
    assert json.loads((part / "results.json").read_text())["1shot"] == \
        json.loads((tmp_path / "full" / "results.json").read_text())["1shot"]


def test_out_never_mixes_two_runs(data_dir, tmp_path):
    base = ["--stage", "classifier", "--model", "resnet12", "--epochs", "1", "--batch-size", "48",
            "--test-episodes", "10"]
    (tmp_path / "file").write_text("x")
    assert "--out " in user_error(data_dir, tmp_path / "file", *base) and "is a file" in user_error(
        data_dir, tmp_path / "file", "--model", "resnet12", "--eval-only", "x.pt")
    out = tmp_path / "run"
    run(data_dir, out, *base)
    message = user_error(data_dir, out, *base)                            # the same --out again, no --resume
    assert f"--out {out} holds a run" in message and "--resume" in message and "--overwrite" in message
    assert len(read_log(out)) == 1
    message = user_error(data_dir, out, *base, "--lr", "0.05", "--seed", "3", "--resume")
    assert "--lr (0.1 there, 0.05 now)" in message and "--seed (0 there, 3 now)" in message
    run(data_dir, out, *base, "--overwrite", "--seed", "3")               # afresh: one log line, the new seed
    assert len(read_log(out)) == 1 and torch.load(out / "checkpoint.pt", weights_only=True)["args"]["seed"] == 3
    # --eval-only writes only results.json: into any folder but a training run's
    assert "holds a training run" in user_error(data_dir, out, "--model", "resnet12", "--eval-only",
                                                out / "checkpoint.pt")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notes.txt").write_text("kept")
    for _ in range(2):                                                    # an existing folder, an earlier result
        run(data_dir, tmp_path / "eval", "--model", "resnet12", "--eval-only", out / "checkpoint.pt")
    assert sorted(os.listdir(tmp_path / "eval")) == ["notes.txt", "results.json"]
    assert "--resume and --overwrite are for training runs" in parse_error("--eval-only", "x.pt", "--resume")


def test_progress_lines_inside_an_epoch(monkeypatch, capsys):
    monkeypatch.setattr(fewshot, "Progress", functools.partial(fewshot.Progress, every=0.0))   # a line every step
    fewshot.main(fewshot.parse_args(["--benchmark", "2", "--model", "resnet12", *TINY, "--batch-size", "8"]))
    out = capsys.readouterr().out
    assert "step 4/5" in out and "step 1/2" in out and "step 2/2" not in out and "images/s  epoch ends in" in out


def test_torchrun_two_processes_train_and_evaluate_every_episode_once(data_dir, teacher_ckpt, tmp_path):
    out = tmp_path / "ddp"
    run_torchrun("fewshot.py", ["--data-dir", data_dir, "--out", out, *TINY, "--stage", "classifier", "--model",
                                "resnet12", "--loss", "kd", "--teacher", "resnet12", "--teacher-ckpt", teacher_ckpt,
                                "--epochs", "1", "--batch-size", "16", "--test-episodes", "41"])
    ddp = json.loads((out / "results.json").read_text())
    assert len(read_log(out)) == 1
    # the same checkpoint evaluated by one process gives the same episodes and the same accuracies
    single = run(data_dir, tmp_path / "single", "--model", "resnet12", "--eval-only", out / "checkpoint.pt",
                 "--test-episodes", "41")
    assert {k: ddp[k] for k in SHOTS} == pytest.approx({k: single[k] for k in SHOTS}, abs=1e-9)
    assert ddp["images"] == single["images"] == 41 * 5 * 3 and ddp["world_size"] == 2
    # the meta stage under DDP: episodes split over the two processes, initialised from the classifier stage
    meta = tmp_path / "meta_ddp"
    run_torchrun("fewshot.py", ["--data-dir", data_dir, "--out", meta, *TINY, "--stage", "meta", "--model",
                                "resnet12", "--init", out / "checkpoint.pt", "--loss", "adaptconf", "--teacher",
                                "resnet12", "--teacher-ckpt", teacher_ckpt, "--epochs", "1", "--batches-per-epoch",
                                "2", "--episodes-per-batch", "1", "--test-episodes", "41"])
    (record,) = read_log(meta)
    assert record["loss_adaptconf"] > 0 and 0 < record["train_beta_mean"] <= 0.5
    single = run(data_dir, tmp_path / "single_meta", "--model", "resnet12", "--eval-only", meta / "checkpoint.pt",
                 "--test-episodes", "41")
    ddp = json.loads((meta / "results.json").read_text())
    assert {k: ddp[k] for k in SHOTS} == pytest.approx({k: single[k] for k in SHOTS}, abs=1e-9)


@pytest.mark.parametrize("stage", ["classifier", "meta"])
def test_benchmark_runs_the_training_loop_on_synthetic_images(capsys, tmp_path, stage):
    """No data, no checkpoints: random images of the real shapes, a random teacher, a random meta-stage encoder."""
    res = fewshot.main(fewshot.parse_args(["--benchmark", "2", "--stage", stage, "--model", "resnet12", "--width",
                                           "4", "--image-size", "16", "--batch-size", "8", "--episodes-per-batch",
                                           "1", "--query", "2", "--loss", "adaptconf", "--teacher", "resnet12",
                                           "--out", str(tmp_path)]))
    assert res["ms_per_step"] > 0 and res["images_per_s"] > 0 and "images/s" in capsys.readouterr().out
    assert json.loads((tmp_path / "benchmark.json").read_text())["ms_per_step"] == res["ms_per_step"]


@pytest.mark.parametrize("stage", ["classifier", "meta"])
def test_training_steps_make_no_host_sync(stage):
    """Counted on the CPU, where torch.cuda.set_sync_debug_mode sees nothing (nothing waits for a device there):
    no .item(), .tolist(), bool() or boolean mask per training step, with every loss (augmentation, teacher,
    loss, β statistics, optimizer: the ordinary loop that --benchmark runs)."""
    found = {}
    for loss in ["ce", "kd", "rkd", "augconf", "adaptconf"]:
        argv = ["--stage", stage, "--model", "resnet12", *TINY, "--batch-size", "4", "--episodes-per-batch", "1",
                "--loss", loss, "--teacher", "resnet12"]
        found[loss] = syncs_per_step(lambda steps: fewshot.main(fewshot.parse_args([*argv, "--benchmark", str(steps)])))
    assert found == {loss: {} for loss in found}


# ---- bad inputs ----------------------------------------------------------------------------------------------------

def meta_baseline_checkpoint(path, model_sd, model_name, legacy=False):
    """A checkpoint as Meta-Baseline's and the official code's train_classifier.py / train_meta.py save it: the yaml
    config, the model's name and arguments, its state_dict and the training state (SGD's state_dict)."""
    params = [torch.nn.Parameter(v.float().clone()) for v in list(model_sd.values())[:2]]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    config = {"train_dataset": "mini-imagenet", "train_dataset_args": {"split": "train", "augment": "resize"},
              "model": model_name, "model_args": {"encoder": "resnet12", "encoder_args": {}},
              "optimizer": "sgd", "optimizer_args": {"lr": 0.1, "weight_decay": 5.e-4, "milestones": [90]},
              "max_epoch": 100, "_parallel": True, "_gpu": "0,1,2,3"}
    save_obj = {"file": "train_classifier.py", "config": config, "model": model_name,
                "model_args": config["model_args"], "model_sd": model_sd,
                "training": {"epoch": 100, "optimizer": "sgd", "optimizer_args": config["optimizer_args"],
                             "optimizer_sd": optimizer.state_dict()}}
    torch.save(save_obj, path, _use_new_zipfile_serialization=not legacy)   # legacy: torch < 1.6's format


@pytest.mark.parametrize("legacy", [False, True])
def test_official_meta_baseline_checkpoint_format_is_read_weights_only(tmp_path, teacher_ckpt, legacy):
    ours = torch.load(teacher_ckpt, weights_only=True)["model"]
    official = {k.replace("head.", "classifier.linear."): v for k, v in ours.items()}
    meta_baseline_checkpoint(tmp_path / "epoch-last.pth", official, "classifier", legacy)
    read = fewshot.read_weights(str(tmp_path / "epoch-last.pth"), "--teacher-ckpt", "resnet12")
    assert read.keys() == ours.keys() and all(torch.equal(read[k], ours[k]) for k in ours)
    meta = {**{k: v for k, v in official.items() if k.startswith("encoder.")}, "temp": torch.tensor(7.0)}
    meta_baseline_checkpoint(tmp_path / "max-va.pth", meta, "meta-baseline", legacy)
    read = fewshot.read_weights(str(tmp_path / "max-va.pth"), "--init", "resnet12")
    assert read["scale"] == 7.0 and "head.weight" not in read
    assert fewshot.encoder_weights(str(tmp_path / "max-va.pth"), "--init", "resnet12").keys() == {
        k[len("encoder."):] for k in ours if k.startswith("encoder.")}


def official_resnet12_bottle(width):
    """The module naming of the official few_shot_leaerning/models/resnet.py `resnet12_bottle` = ResNet([1, 1, 1, 1]):
    each stage an nn.Sequential holding one block (layerK.0.conv1 ..., shortcut layerK.0.downsample.{0,1}, a max-pool
    without parameters); forward: the four stages, then the spatial mean."""
    encoder, cin = torch.nn.Module(), 3
    for k, c in enumerate((width, 2 * width, 4 * width, 8 * width)):
        encoder.add_module(f"layer{k + 1}", torch.nn.Sequential(fewshot.Block(cin, c, first_in_stage=True)))
        cin = c
    return encoder


def test_official_resnet12_bottle_checkpoint_loads_strictly_with_the_same_outputs(tmp_path):
    """A checkpoint written with the official names (layerK.0.*, classifier.linear.*, temp) loads with strict=True into
    our ResNet-12 teacher (classifier stage) and encoder (meta stage / --init / --eval-only) and gives its outputs."""
    torch.manual_seed(3)
    official = official_resnet12_bottle(4).eval()
    with torch.no_grad():   # random BN statistics and affine parameters: a misplaced tensor changes the outputs
        for m in official.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    linear = torch.nn.Linear(32, 8)
    model_sd = {**{f"encoder.{k}": v for k, v in official.state_dict().items()},
                "classifier.linear.weight": linear.weight.detach(), "classifier.linear.bias": linear.bias.detach()}
    assert "encoder.layer2.0.downsample.1.running_var" in model_sd
    meta_baseline_checkpoint(tmp_path / "epoch-last.pth", model_sd, "classifier")
    args = fewshot.parse_args(["--model", "resnet12", "--width", "4", "--loss", "kd", "--teacher", "resnet12",
                               "--teacher-ckpt", str(tmp_path / "epoch-last.pth")])
    teacher = fewshot.load_teacher(args, 8, torch.device("cpu"))   # strict: every tensor named and used
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        features = official.layer4(official.layer3(official.layer2(official.layer1(x)))).flatten(2).mean(2)
        logits, ours = teacher(x)
        torch.testing.assert_close(ours, features)
        torch.testing.assert_close(logits, linear(features))
    meta = {**{k: v for k, v in model_sd.items() if k.startswith("encoder.")}, "temp": torch.tensor(7.0)}
    meta_baseline_checkpoint(tmp_path / "max-va.pth", meta, "meta-baseline")
    encoder = fewshot.MODELS["resnet12"](4).eval()
    fewshot.load_weights(encoder, fewshot.encoder_weights(str(tmp_path / "max-va.pth"), "--init", "resnet12"), "x")
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), features)
    # deeper ResNets keep layerK.i.*: an official resnet18_bottle key is not renamed
    assert "encoder.layer1.0.conv1.weight" in fewshot.read_weights(str(tmp_path / "max-va.pth"), "--init", "resnet18")


def test_val_episodes_are_the_official_ones_on_the_16_val_classes(tmp_path):
    """Table 6's val score: the val split (here 16 classes, labels 8..23 in the pickle), 800 episodes per shot drawn as
    the official train_meta.py draws them: np.random.seed(0), then CategoriesSampler episode after episode (classes
    with np.random.choice, then each class's shot + query images). Reference: those draws and the prototype classifier
    written out in float64 over the encoder's features."""
    root = write_pickles(tmp_path, classes=(8, 16, 5), per_class=(12, 9, 8))
    args = fewshot.parse_args(["--data-dir", root, "--stage", "meta", "--init", "x.pt", "--width", "4",
                               "--image-size", "16", "--query", "3"])
    _, val, _ = fewshot.load_data(args, 0, 1, torch.device("cpu"))
    assert len(val[2]) == 16 and len(val[1]) == 16 * 9
    torch.manual_seed(0)
    encoder = fewshot.MODELS["resnet12"](4)
    result = fewshot.evaluate(args, encoder, val, args.val_episodes, 0, 1, torch.device("cpu"))
    with torch.no_grad():
        features = encoder(fewshot.normalize(val[0])).double().numpy()
    labels = val[1].numpy()
    catlocs = [np.argwhere(labels == c).reshape(-1) for c in range(labels.max() + 1)]
    state = np.random.get_state()
    for shot in (1, 5):
        np.random.seed(0)
        accs = []
        for _ in range(200 * 4):
            episode = [np.random.choice(catlocs[c], shot + 3, replace=False)
                       for c in np.random.choice(len(catlocs), 5, replace=False)]
            protos = [features[e[:shot]].mean(0) / np.linalg.norm(features[e[:shot]].mean(0)) for e in episode]
            accs.append(np.mean([np.argmax([features[q] @ p for p in protos]) == j
                                 for j, e in enumerate(episode) for q in e[shot:]]))
        assert result[f"{shot}shot"] == pytest.approx(100 * np.mean(accs), abs=1e-9)
    np.random.set_state(state)


def test_missing_split(tmp_path):
    root = write_pickles(tmp_path)
    os.remove(os.path.join(root, "miniImageNet_category_split_test.pickle"))
    assert "test split is missing" in user_error(root, tmp_path / "o", "--epochs", "1", "--model", "resnet12")
    assert "train split is missing" in user_error(str(tmp_path / "nowhere"), tmp_path / "o", "--epochs", "1")
    with open(os.path.join(root, "miniImageNet_category_split_val.pickle"), "r+b") as f:
        f.truncate(100)                                                    # a download cut short
    assert "split_val.pickle is not a miniImageNet pickle" in user_error(root, tmp_path / "o", "--epochs", "1")


def test_too_few_images_per_class(tmp_path):
    root = write_pickles(tmp_path, per_class=(12, 7, 8))    # val: 7 < 5 shots + 3 queries
    assert "only 7 images, but an episode needs shot + query = 8" in user_error(root, tmp_path / "o", "--epochs", "1")
    assert "5 classes, fewer than the 6" in user_error(root, tmp_path / "o", "--epochs", "1", "--way", "6")


def test_an_unreadable_image_stops_the_run_before_training_with_its_path(tmp_path):
    root = make_image_tree(str(tmp_path / "tree"), splits=("train", "val", "test"), num_classes=5, per_class=8,
                           size=20)
    bad = os.path.join(root, "val", "class_002", "0003.JPEG")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)                              # a truncated JPEG
    message = user_error(root, tmp_path / "out", "--model", "resnet12", "--epochs", "1", "--batch-size", "16")
    assert f"cannot read the image {bad}" in message
    assert not os.path.exists(tmp_path / "out" / "log.jsonl")             # stopped before training


def test_bad_arguments_stop_in_parse_args():
    assert "pass --teacher and --teacher-ckpt" in parse_error("--loss", "kd")
    assert "pass --teacher and --teacher-ckpt" in parse_error("--loss", "kd", "--teacher", "resnet12")
    assert "pass --init" in parse_error("--stage", "meta")
    assert "--init is for the meta stage" in parse_error("--init", "cls.pt")
    assert "nothing to learn from" in parse_error("--gt-weight", "0")
    assert "invalid choice" in parse_error("--loss", "dkd")


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be > 0 and finite, got 0"),
    (["--epochs", "-1"], "--epochs must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--tau", "0"], "--tau must be > 0"), (["--tau", "-1"], "--tau must be > 0"),
    (["--tau", "nan"], "--tau must be > 0 and finite, got nan"),
    (["--kd-T", "inf"], "--kd-T must be > 0 and finite, got inf"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--test-episodes", "-1"], "--test-episodes must be > 0"),
    (["--val-episodes", "0"], "--val-episodes must be > 0"),
    (["--query", "0"], "--query must be > 0"), (["--width", "0"], "--width must be > 0"),
    (["--lr-decay-epoch", "-1"], "--lr-decay-epoch must be >= 0"), (["--weight-decay", "-1e-4"], "--weight-decay"),
    (["--kd-weight", "nan"], "--kd-weight must be >= 0 and finite"),
    (["--benchmark", "-2"], "--benchmark must be >= 0"),
    (["--stage", "meta", "--init", "x.pt", "--batches-per-epoch", "0"], "--batches-per-epoch must be > 0"),
])
def test_bad_numbers_are_refused_naming_the_flag(argv, message):
    assert message in parse_error(*argv)


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "folder", "missing"])
@pytest.mark.parametrize("flag", ["--teacher-ckpt", "--eval-only", "--init"])
def test_a_bad_checkpoint_is_one_line_naming_its_flag_and_file(data_dir, teacher_ckpt, tmp_path, flag, kind):
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        data = open(teacher_ckpt, "rb").read()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    argv = {"--teacher-ckpt": ["--loss", "kd", "--teacher", "resnet12", "--teacher-ckpt", path],
            "--eval-only": ["--eval-only", path],
            "--init": ["--stage", "meta", "--init", path]}[flag]
    message = user_error(data_dir, tmp_path / "o", "--model", "resnet12", "--epochs", "1", *argv)
    assert f"{flag} {path} is " in message
    assert {"folder": "a folder", "missing": "missing"}.get(kind, "not a readable weights-only") in message


def test_bad_teachers_and_inits(data_dir, teacher_ckpt, tmp_path):
    base = ["--epochs", "1", "--model", "resnet12"]
    message = user_error(data_dir, tmp_path / "o", *base, "--loss", "kd", "--teacher", "resnet18", "--teacher-ckpt",
                         teacher_ckpt)                                     # a ResNet-12 checkpoint as ResNet-18
    assert f"--teacher-ckpt {teacher_ckpt}" in message and "layer1.0.conv1.weight" in message
    os.makedirs(tmp_path / "other")
    other = write_pickles(tmp_path / "other", classes=(6, 5, 5))
    message = user_error(other, tmp_path / "o", *base, "--loss", "kd", "--teacher", "resnet12", "--teacher-ckpt",
                         teacher_ckpt)
    assert "'head.weight' has shape (8, 32) in the checkpoint but (6, 32)" in message
    meta_checkpoint(tmp_path / "meta.pt")
    assert "has no linear head; the classifier stage needs a classifier-stage teacher" in user_error(
        data_dir, tmp_path / "o", *base, "--loss", "kd", "--teacher", "resnet12", "--teacher-ckpt",
        tmp_path / "meta.pt")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")   # a model of something else
    message = user_error(data_dir, tmp_path / "o", *base, "--stage", "meta", "--init", tmp_path / "other.pt")
    assert f"--init {tmp_path / 'other.pt'} holds no 'encoder.*' tensors" in message
    torch.save({"args": {"lr": 0.1}}, tmp_path / "nomodel.pt")
    assert "holds no state_dict" in user_error(data_dir, tmp_path / "o", *base, "--eval-only", tmp_path / "nomodel.pt")
