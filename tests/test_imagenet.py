"""imagenet.py on CPU with tiny generated ImageFolder trees: models, feature shapes, train → distil → evaluate,
a real two-process torchrun, exact resume, the benchmark on synthetic images, and the errors people hit first
(bad numbers, corrupt checkpoints, --out/--resume mistakes, unreadable images): one UserError line each."""
import argparse
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch

import imagenet
from conftest import make_image_tree, run_torchrun, syncs_per_step

# 3 classes; 4 training images per class (3 steps of 4), 5 validation images per class: 15, an odd count that
# two processes cannot split evenly, so padding or double counting would show
NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 4, 5
TINY = ["--image-size", "32", "--batch-size", "4", "--workers", "0", "--lr", "0.4", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagefolder"))
    make_image_tree(root, splits=("train",), num_classes=NUM_CLASSES, per_class=TRAIN_PER_CLASS, size=40)
    make_image_tree(root, splits=("val",), num_classes=NUM_CLASSES, per_class=VAL_PER_CLASS, size=40, seed=1)
    return root


@pytest.fixture(scope="module")
def teacher_ckpt(data_dir, tmp_path_factory):
    """A resnet18 teacher trained for one epoch with --loss ce (the first stage of every Table 4 run)."""
    out = str(tmp_path_factory.mktemp("teacher"))
    result = imagenet.main(imagenet.parse_args(["--data-dir", data_dir, "--model", "resnet18", "--loss", "ce",
                                                "--epochs", "1", "--out", out, *TINY]))
    assert result["images"] == NUM_CLASSES * VAL_PER_CLASS
    return os.path.join(out, "checkpoint.pt"), result


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def loss_args(loss, *extra):
    """Arguments of a distillation run (parse_args requires a teacher; these tests never read its checkpoint)."""
    return imagenet.parse_args(["--image-size", "32", "--loss", loss, "--teacher", "mobilenetv1", "--teacher-ckpt",
                                "unread.pt", *extra])


def refused(argv):
    """parse_args refuses `argv`: returns the UserError's one line."""
    with pytest.raises(SystemExit) as excinfo:
        imagenet.parse_args(argv)
    return str(excinfo.value)


def stops(argv, *patterns):
    """main(parse_args(argv)) stops with one UserError line (no traceback) that matches every regex pattern."""
    with pytest.raises(imagenet.UserError) as excinfo:
        imagenet.main(imagenet.parse_args(argv))
    message = str(excinfo.value)
    assert message.startswith(f"{os.path.basename(imagenet.sys.argv[0])}: error: ") and "\n" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def test_mobilenetv1_matches_the_published_size_and_names():
    net = imagenet.MobileNetV1(num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == 4_231_976
    names = list(net.state_dict())
    # mdistiller / official names: model.<block>.<layer>, 14 conv blocks, fc
    assert names[:2] == ["model.0.0.weight", "model.0.1.weight"]
    assert "model.13.3.weight" in names and "model.13.4.running_var" in names and "model.14.weight" not in names
    assert names[-2:] == ["fc.weight", "fc.bias"]
    assert net.state_dict()["model.13.3.weight"].shape == (1024, 1024, 1, 1)


@pytest.mark.parametrize("name, channels, embed", [("resnet18", [64, 128, 256, 512], 512),
                                                  ("resnet50", [256, 512, 1024, 2048], 2048),
                                                  ("mobilenetv1", [128, 256, 512, 1024], 1024)])
def test_forward_features_shapes(name, channels, embed):
    net = imagenet.MODELS[name](num_classes=7).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        logits, feats, pooled = imagenet.forward_features(net, x)
        assert torch.allclose(logits, net(x), atol=1e-5)     # the same computation as the plain forward
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // 2 ** (i + 2), 32 // 2 ** (i + 2))
                                               for i, c in enumerate(channels)]
    assert pooled.shape == (2, embed)
    if name == "mobilenetv1":   # stage outputs before their last ReLU (mdistiller, official code): ReLU'd = the blocks
        assert all((f < 0).any() for f in feats)
        with torch.no_grad():
            assert torch.equal(torch.relu(feats[1]), net.model[:6](x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_blocks_start_as_identity(name):
    """timm's zero_init_last (torchvision's zero_init_residual): each block's last BN γ is 0 at construction, so a
    block without a downsample maps its (non-negative, post-ReLU) input to itself, and one with a downsample gives
    ReLU(downsample(x)); every other BN γ is 1."""
    net = imagenet.MODELS[name](num_classes=10).eval()
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    for block in blocks:
        last = block.bn3 if hasattr(block, "bn3") else block.bn2
        assert torch.all(last.weight == 0)
        others = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d) and m is not last]
        assert all(torch.all(m.weight == 1) for m in others)
        x = torch.rand(2, block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            expected = x if block.downsample is None else torch.relu(block.downsample(x))
            assert torch.equal(block(x), expected)
    assert sum(b.downsample is None for b in blocks) >= 4


def test_lr_schedule_is_timms_step_scheduler_with_warm_up():
    """Per epoch, as timm's StepLRScheduler (warmup_t 3, warmup_lr_init 1e-4, decay_t 30, rate 0.1, warm-up not a
    prefix) is stepped by the official train.py: written here as a linspace and a count of passed milestones."""
    for world_size, lr, batch in ((8, 0.1, 64), (1, 0.4, 32)):
        args = imagenet.parse_args(["--lr", str(lr), "--batch-size", str(batch)])
        peak = lr * batch * world_size / 512
        warm = np.linspace(1e-4, peak, 4)[:3]   # epochs 0, 1, 2; epoch 3 reaches the peak
        expected = [warm[e] if e < 3 else peak * 0.1 ** sum(e >= m for m in (30, 60, 90)) for e in range(100)]
        got = [imagenet.lr_at(args, e, world_size) for e in range(100)]
        assert got == pytest.approx(expected, rel=1e-12, abs=0)
    args = imagenet.parse_args(["--warmup-epochs", "0"])
    assert imagenet.lr_at(args, 0, 8) == 0.1 and imagenet.lr_at(args, 30, 8) == pytest.approx(0.01)
    assert "--warmup-epochs 3 must be below --epochs 3" in refused(["--epochs", "3"])


def test_weight_decay_skips_biases_and_every_1d_parameter():
    """timm's param_groups_weight_decay over the student and the loss's head (ReviewKD's fusion has conv biases)."""
    args = loss_args("reviewkd")
    student, teacher = imagenet.MODELS["resnet18"](num_classes=5), imagenet.MODELS["mobilenetv1"](num_classes=5)
    model = imagenet.StudentWithHead(student, imagenet.build_head(args, student, teacher), args.fitnet_stage)
    no_decay, decay = imagenet.param_groups(model, 1e-4)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 1e-4)
    ids = lambda params: {id(p) for p in params}
    for name, p in model.named_parameters():
        bn_or_bias = p.ndim == 1 or name.endswith(".bias")
        assert (id(p) in ids(no_decay["params"]), id(p) in ids(decay["params"])) == (bn_or_bias, not bn_or_bias), name
    names = {n for n, p in model.named_parameters() if id(p) in ids(no_decay["params"])}
    assert {"net.bn1.weight", "net.fc.bias", "net.layer1.0.bn2.bias"} <= names and "net.fc.weight" not in names
    assert any(n.startswith("head.") and n.endswith(".bias") for n in names)   # conv biases of the fusion
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name, mode", [("resnet18", "BILINEAR"), ("resnet34", "BILINEAR"), ("resnet50", "BICUBIC"),
                                        ("mobilenetv1", "BICUBIC")])
def test_evaluation_resize_per_model(data_dir, name, mode):
    """timm's per-model interpolation (resnet18/34 bilinear; resnet50 and the config-less MobileNetV1 bicubic), with
    the official crop fraction 0.95: the val image equals PIL's resize of the file (40 px → int(32/0.95) = 33) then
    the centre 32 px."""
    from PIL import Image
    args = imagenet.parse_args(["--data-dir", data_dir, "--model", name, "--eval-only", "x.pt", *TINY])
    _, val_loader, _ = imagenet.load_data(args, 0, 1, torch.device("cpu"))
    image, _ = val_loader.dataset[0]
    path = val_loader.dataset.dataset.samples[0][0]
    pil = Image.open(path).convert("RGB").resize((33, 33), getattr(Image, mode)).crop((0, 0, 32, 32))
    expected = (torch.tensor(np.asarray(pil), dtype=torch.float32).permute(2, 0, 1) / 255
                - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(image, expected, atol=1e-5)
    other = Image.open(path).convert("RGB").resize((33, 33), Image.BICUBIC if mode == "BILINEAR" else Image.BILINEAR)
    assert not np.array_equal(np.asarray(other.crop((0, 0, 32, 32))), np.asarray(pil))   # the choice is visible


def test_training_crops_pick_bilinear_or_bicubic_at_random(data_dir):
    """timm's train_interpolation 'random' (the official default): each crop resamples bilinearly or bicubically, half
    and half, from torch's RNG (seeded per epoch, so --resume replays it)."""
    from PIL import Image
    args = imagenet.parse_args(["--data-dir", data_dir, "--model", "resnet18", *TINY])
    train_loader, _, _ = imagenet.load_data(args, 0, 1, torch.device("cpu"))
    crop = train_loader.dataset.transform.transforms[0]
    assert isinstance(crop, imagenet.RandomInterpolationCrop)
    img = Image.new("RGB", (40, 40))
    torch.manual_seed(0)
    modes = []
    for _ in range(400):
        crop(img)
        modes.append(crop.interpolation)
    counts = {m: modes.count(m) for m in set(modes)}
    assert set(counts) == {imagenet.BILINEAR, imagenet.BICUBIC} and 160 <= counts[imagenet.BICUBIC] <= 240
    torch.manual_seed(0)
    assert [(crop(img), crop.interpolation)[1] for _ in range(50)] == modes[:50]   # the same seed, the same draws


def test_feature_heads_map_student_onto_teacher_shapes():
    args = loss_args("reviewkd")
    student = imagenet.MODELS["resnet50"](num_classes=5)
    teacher = imagenet.MODELS["mobilenetv1"](num_classes=5).eval()
    model = imagenet.StudentWithHead(student, imagenet.build_head(args, student, teacher), args.fitnet_stage)
    x = torch.randn(2, 3, 32, 32)
    _, t_feats, t_pooled = imagenet.forward_features(teacher, x)
    fused = model(x)[3]
    assert [f.shape for f in fused] == [f.shape for f in t_feats] + [(2, 1024, 1, 1)]
    args = loss_args("fitnet")   # official FitNet: a bias-free 1x1 conv per stage 1-4, the summed MSEs, weight 1
    model = imagenet.StudentWithHead(student, imagenet.build_head(args, student, teacher), args.fitnet_stage)
    assert args.fitnet_stage == [1, 2, 3, 4] and args.fitnet_weight == 1.0
    assert all(conv.kernel_size == (1, 1) and conv.bias is None for conv in model.head)
    out = model(x)
    assert [h.shape for h in out[3]] == [f.shape for f in t_feats]
    loss = imagenet.loss_terms(args, 0, out, (torch.zeros(2, 5), t_feats, t_pooled), torch.tensor([0, 1]))["fitnet"]
    expected = sum(((conv(s) - t) ** 2).mean() for conv, s, t in zip(model.head, out[1], t_feats))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    args = loss_args("fitnet", "--fitnet-stage", "2")   # one stage: the stride-8 one
    model = imagenet.StudentWithHead(student, imagenet.build_head(args, student, teacher), args.fitnet_stage)
    assert [h.shape for h in model(x)[3]] == [t_feats[1].shape] == [(2, 256, 4, 4)]


def test_every_table4_loss_gives_a_finite_loss_and_student_gradients():
    """One forward/backward per loss of Table 4 (resnet18 student, mobilenetv1 teacher, 32 px, batch 4)."""
    teacher = imagenet.MODELS["mobilenetv1"](num_classes=5).eval().requires_grad_(False)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        teacher_out = imagenet.forward_features(teacher, images)
    for loss in imagenet.LOSSES:
        args = loss_args(loss, "--epochs", "10")
        student = imagenet.MODELS["resnet18"](num_classes=5)
        model = imagenet.StudentWithHead(student, imagenet.build_head(args, student, teacher), args.fitnet_stage)
        terms = imagenet.loss_terms(args, 1, model(images), None if loss == "ce" else teacher_out, labels)
        total = sum(terms.values())
        total.backward()
        assert torch.isfinite(total) and terms["gt"] > 0, loss
        assert student.conv1.weight.grad.abs().sum() > 0, loss
        assert sorted(terms) == sorted({"gt", loss} - {"ce"}), loss     # gt, and the loss's own term


def test_teacher_only_feature_losses_also_learn_the_teacher_logits():
    """With --gt-weight 0 a feature loss alone would leave the classifier untrained; the KD term gives it a signal."""
    teacher = imagenet.MODELS["mobilenetv1"](num_classes=5).eval().requires_grad_(False)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        teacher_out = imagenet.forward_features(teacher, images)
    for loss in ("fitnet", "rkd", "reviewkd"):
        args = loss_args(loss, "--gt-weight", "0")
        student = imagenet.MODELS["resnet18"](num_classes=5)
        model = imagenet.StudentWithHead(student, imagenet.build_head(args, student, teacher), args.fitnet_stage)
        terms = imagenet.loss_terms(args, 0, model(images), teacher_out, labels)
        assert sorted(terms) == sorted({"kd", loss}), loss     # no gt term without labels
        sum(terms.values()).backward()
        assert student.fc.weight.grad is not None and student.fc.weight.grad.abs().sum() > 0, loss


def test_dkd_has_its_own_temperature():
    """--dkd-T (default 1, the temperature DKD shared with --kd-T before) sets DKD's temperature; --kd-T does not."""
    logits, t_logits, labels = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    dkd = lambda *extra: imagenet.loss_terms(loss_args("dkd", *extra), 0, (logits, None, None, None),
                                             (t_logits, None, None), labels)["dkd"]
    assert dkd("--kd-T", "4") == dkd() != dkd("--dkd-T", "4")


def test_teacher_then_distil_then_evaluate(data_dir, teacher_ckpt, tmp_path):
    """resnet18 teacher (ce, the fixture) → student with adaptconf, reviewkd, and augconf without labels
    (--gt-weight 0, Table 2b style) → --eval-only. kd runs in the torchrun test, fitnet in the resume test."""
    ckpt, teacher_result = teacher_ckpt
    for loss, gt_weight in (("adaptconf", "1"), ("reviewkd", "1"), ("augconf", "0")):
        out = str(tmp_path / loss)
        result = imagenet.main(imagenet.parse_args(
            ["--data-dir", data_dir, "--model", "resnet18", "--teacher", "resnet18", "--teacher-ckpt", ckpt,
             "--loss", loss, "--gt-weight", gt_weight, "--epochs", "1", "--out", out, *TINY]))
        # the loaded teacher scores exactly what it scored at the end of its own run: same weights, same crop
        assert result["teacher_top1"] == teacher_result["top1"]
        assert result["images"] == NUM_CLASSES * VAL_PER_CLASS
        (record,) = read_log(out)
        assert record["train_images"] == 12 and record[f"loss_{loss}"] > 0 and record["images"] == 15
        assert 0 <= record["top1"] <= 100 and record["top1"] <= record["top5"]
        if gt_weight == "0":      # teacher-only: the loss is the distillation term alone
            assert "loss_gt" not in record and record["loss"] == pytest.approx(record[f"loss_{loss}"], rel=1e-5)
        else:
            assert record["loss"] == pytest.approx(record[f"loss_{loss}"] + record["loss_gt"], rel=1e-5)
        if loss == "adaptconf":   # Figure 3: β of the training batches
            assert 0 < record["train_beta_mean"] <= 0.5 and 0 <= record["train_beta_frac_half"] <= 1
            assert len(record["train_beta_hist"]) == 10 and sum(record["train_beta_hist"]) == pytest.approx(1.0)
            assert record["train_beta_hist"][-1] >= record["train_beta_frac_half"]   # β = 0.5 falls in the last bin
        saved = read_results(out)
        assert saved["top1"] == result["top1"] and saved["args"]["loss"] == loss
    # --eval-only on the last student's checkpoint reproduces its final accuracy
    evaluated = imagenet.main(imagenet.parse_args(["--data-dir", data_dir, "--model", "resnet18", "--eval-only",
                                                   os.path.join(out, "checkpoint.pt"), "--out", str(tmp_path / "ev"),
                                                   *TINY]))
    assert (evaluated["top1"], evaluated["top5"]) == (result["top1"], result["top5"])
    assert read_results(str(tmp_path / "ev"))["images"] == 15


def test_two_process_torchrun_counts_every_val_image_once(data_dir, teacher_ckpt, tmp_path):
    ckpt, _ = teacher_ckpt
    out = str(tmp_path / "ddp")
    run_torchrun("imagenet.py", ["--data-dir", data_dir, "--model", "resnet18", "--teacher", "resnet18",
                                 "--teacher-ckpt", ckpt, "--loss", "kd", "--epochs", "1", "--out", out,
                                 "--image-size", "32", "--batch-size", "4", "--workers", "1", "--warmup-epochs", "0"],
                 nproc=2)
    result = read_results(out)
    assert result["world_size"] == 2 and result["images"] == 15
    (record,) = read_log(out)
    assert record["train_images"] == 8           # 6 images per process → one full batch of 4 each
    # exact distributed evaluation: the same weights evaluated by one process give the same counts
    single = imagenet.main(imagenet.parse_args(["--data-dir", data_dir, "--model", "resnet18", "--eval-only",
                                                os.path.join(out, "checkpoint.pt"), *TINY]))
    assert (single["top1"], single["top5"], single["images"]) == (result["top1"], result["top5"], 15)
    # the mean validation loss is continuous: it also catches shards evaluated with different BatchNorm statistics
    assert single["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)


def test_resume_reproduces_an_uninterrupted_run(data_dir, teacher_ckpt, tmp_path, capsys):
    """One command line (--resume) for the first launch into an empty folder and for the restart; the restart drops a
    cut-off log line and a killed write's checkpoint.pt.tmp, refuses changed arguments, and ends where an
    uninterrupted run ends. --overwrite starts afresh in a folder holding a run."""
    ckpt, _ = teacher_ckpt
    base = ["--data-dir", data_dir, "--model", "resnet18", "--teacher", "resnet18", "--teacher-ckpt", ckpt,
            "--loss", "fitnet", *TINY, "--warmup-epochs", "1"]   # the warm-up epoch, then the peak lr
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    os.makedirs(full)
    with open(os.path.join(full, "log.jsonl"), "w") as f:   # an earlier run's log
        f.write('{"epoch": 0, "loss": 99.0}\n')
    stops([*base, "--epochs", "3", "--out", full], "--out .*full holds a run \\(log.jsonl\\); pass --resume")
    imagenet.main(imagenet.parse_args([*base, "--epochs", "3", "--out", full, "--overwrite"]))
    os.makedirs(split)
    imagenet.main(imagenet.parse_args([*base, "--epochs", "2", "--out", split, "--resume"]))   # empty: a fresh run
    assert "a fresh run" in capsys.readouterr().out
    # a killed third epoch: half a log line, a half-written checkpoint
    with open(os.path.join(split, "log.jsonl"), "a") as f:
        f.write('{"epoch": 2, "lr": 0.')
    with open(os.path.join(split, "checkpoint.pt.tmp"), "wb") as f:
        f.write(b"PK\x03\x04 half")
    stops([*base, "--epochs", "3", "--out", split, "--resume", "--lr", "0.2", "--seed", "1"],
          "--resume: the run in --out was started with other --lr \\(0.4 there, 0.2 now\\), --seed \\(0 there, 1 "
          "now\\)")
    imagenet.main(imagenet.parse_args([*base, "--epochs", "3", "--out", split, "--resume"]))
    assert "resuming" in capsys.readouterr().out
    assert sorted(os.listdir(split)) == ["checkpoint.pt", "log.jsonl", "results.json"]
    # every checkpoint we write loads weights_only (resuming read it so, too)
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)
    for part in ("model", "head"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part} tensor {name} differs after resume"
    assert [r["epoch"] for r in read_log(split)] == [r["epoch"] for r in read_log(full)] == [0, 1, 2]
    assert [r["loss"] for r in read_log(split)] == [r["loss"] for r in read_log(full)]
    assert [r["lr"] for r in read_log(split)] == [r["lr"] for r in read_log(full)] == [1e-4, 0.4 * 4 / 512, 0.4 * 4 / 512]
    # the optimizer: Nesterov SGD; no weight decay on the 1-D parameters and biases of the student and FitNet's head
    groups = a["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 1e-4] and all(g["nesterov"] for g in groups)
    net = imagenet.MODELS["resnet18"](num_classes=NUM_CLASSES)
    assert len(groups[0]["params"]) == sum(p.ndim == 1 for p in net.parameters())   # head: bias-free convs only
    assert read_results(split)["teacher_top1"] == read_results(full)["teacher_top1"]


def test_benchmark_runs_the_training_step_on_synthetic_images(tmp_path, capsys):
    """No data tree is read; a teacher without weights has random ones; nothing is logged or checkpointed."""
    out = str(tmp_path / "bench")
    result = imagenet.main(imagenet.parse_args(["--data-dir", str(tmp_path / "none"), "--model", "resnet18",
                                                "--teacher", "resnet18", "--loss", "adaptconf", "--benchmark", "2",
                                                "--out", out, *TINY]))
    with open(os.path.join(out, "benchmark.json")) as f:
        saved = json.load(f)
    assert saved["images_per_s"] > 0 and saved["ms_per_step"] > 0 and saved["args"]["benchmark"] == 2
    assert result["images_per_s"] == saved["images_per_s"]
    assert "images/s" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["benchmark.json"]      # a benchmark trains, but keeps nothing
    with open(os.path.join(out, "log.jsonl"), "w") as f:      # beside a run, it replaces only benchmark.json
        f.write('{"epoch": 0}\n')
    imagenet.main(imagenet.parse_args(["--model", "resnet18", "--benchmark", "1", "--out", out, *TINY]))
    assert sorted(os.listdir(out)) == ["benchmark.json", "log.jsonl"]
    assert imagenet.main(imagenet.parse_args(["--model", "resnet18", "--benchmark", "1", *TINY]))["ms_per_step"] > 0
    assert "distils from a teacher" in refused(["--loss", "kd", "--benchmark", "1"])


def test_training_steps_make_no_host_sync(data_dir):
    """No per-step .item/.tolist/bool/nonzero/boolean-mask indexing in the training loop, for every loss: on the CPU
    nothing waits, so torch.cuda.set_sync_debug_mode would report nothing here, and counting the calls stands in."""
    for loss in imagenet.LOSSES:   # --benchmark: the ordinary train_one_epoch on synthetic batches, 1000 classes
        distil = [] if loss == "ce" else ["--teacher", "mobilenetv1"]
        run = lambda steps: imagenet.main(imagenet.parse_args(["--model", "resnet18", *distil, "--loss", loss,
                                                               "--benchmark", str(steps), *TINY]))
        assert syncs_per_step(run) == {}, loss
    # the real ImageFolder loader; --workers 1 runs the CPU transforms (which read random draws) in a worker process
    args = imagenet.parse_args(["--data-dir", data_dir, "--model", "resnet18", "--teacher", "resnet18", "--loss",
                                "adaptconf", "--teacher-ckpt", "unread.pt", *TINY, "--workers", "1"])
    loader, cpu = imagenet.load_data(args, 0, 1, torch.device("cpu"))[0], torch.device("cpu")
    teacher = imagenet.MODELS["resnet18"](num_classes=NUM_CLASSES).eval().requires_grad_(False)
    model = imagenet.StudentWithHead(imagenet.MODELS["resnet18"](num_classes=NUM_CLASSES), None, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert syncs_per_step(lambda steps: imagenet.train_one_epoch(args, model, teacher, optimizer, loader, 0, 0, cpu,
                                                                 max_steps=steps)) == {}


def test_arguments_are_checked_before_any_data_is_read():
    assert "needs labels" in refused(["--loss", "ce", "--gt-weight", "0"])
    assert "needs labels" in refused(["--loss", "dkd", "--teacher", "resnet18", "--teacher-ckpt", "t.pt",
                                      "--gt-weight", "0"])
    assert "pass --teacher and exactly one" in refused(["--loss", "adaptconf"])
    assert "pass --teacher and exactly one" in refused(["--loss", "kd", "--teacher", "resnet18", "--teacher-ckpt",
                                                        "t.pt", "--teacher-weights", "IMAGENET1K_V1"])
    assert "has no weights 'IMAGENET1K_V9'" in refused(["--teacher", "resnet18", "--teacher-weights",
                                                        "IMAGENET1K_V9", "--loss", "kd"])
    assert "no weights 'IMAGENET1K_V1' for mobilenetv1" in refused(["--teacher", "mobilenetv1", "--teacher-weights",
                                                                    "IMAGENET1K_V1", "--loss", "kd"])
    assert "invalid choice: 'resnet1001'" in refused(["--model", "resnet1001"])   # unknown models by name
    # numbers: finite, counts/rates/temperatures > 0, fractions in [0, 1], the rest >= 0; the flag is named
    for flag, value, rule in [("--epochs", "0", "> 0"), ("--epochs", "-1", "> 0"), ("--batch-size", "0", "> 0"),
                              ("--lr", "0", "> 0"), ("--lr", "inf", "> 0"), ("--tau", "0", "> 0"),
                              ("--tau", "-1", "> 0"), ("--tau", "nan", "> 0"), ("--kd-T", "0", "> 0"),
                              ("--dkd-T", "-2", "> 0"), ("--image-size", "0", "> 0"), ("--workers", "-1", ">= 0"),
                              ("--crop-fraction", "0", "in (0, 1]"), ("--label-smoothing", "1.5", "in [0, 1]"),
                              ("--kd-weight", "-1", ">= 0"), ("--benchmark", "-3", ">= 0")]:
        message = refused(["--model", "resnet18", flag, value])
        head, got = message.rsplit(", got ", 1)
        assert head.endswith(f": error: {flag} must be {rule} and finite"), message
        assert got in (value, str(float(value))), message


def test_bad_inputs_stop_with_a_sentence(data_dir, teacher_ckpt, tmp_path):
    ckpt, _ = teacher_ckpt
    stops(["--data-dir", str(tmp_path / "nowhere"), *TINY], "--data-dir .*nowhere does not exist")
    make_image_tree(str(tmp_path / "no_train"), splits=("val",), num_classes=2, per_class=1, size=8)
    stops(["--data-dir", str(tmp_path / "no_train"), *TINY], "no train/ folder in --data-dir")
    # val/ exists with class folders, train/ exists but holds no images
    empty = tmp_path / "empty"
    make_image_tree(str(empty), splits=("val",), num_classes=2, per_class=1, size=8)
    os.makedirs(empty / "train" / "class_000")
    stops(["--data-dir", str(empty), *TINY], "train holds no class folders with images")
    # a teacher trained on 3 classes cannot teach on 4
    four = str(tmp_path / "four")
    make_image_tree(four, num_classes=4, per_class=2, size=8)
    stops(["--data-dir", four, "--model", "resnet18", "--teacher", "resnet18", "--teacher-ckpt", ckpt, "--loss", "kd",
           *TINY], "--teacher-ckpt .*checkpoint.pt\\) predicts 3 classes but the data has 4")
    # train/ and val/ disagree on the classes
    mixed = str(tmp_path / "mixed")
    make_image_tree(mixed, splits=("train",), num_classes=3, per_class=2, size=8)
    make_image_tree(mixed, splits=("val",), num_classes=2, per_class=2, size=8)
    stops(["--data-dir", mixed, *TINY], "train/ has 3 classes and val/ has 2")
    stops(["--data-dir", data_dir, *TINY, "--batch-size", "64"], "fewer than one batch of 64 .* lower --batch-size")
    # torchvision weights: 1000 ImageNet classes (checked offline, before any download)
    stops(["--data-dir", data_dir, "--teacher", "resnet18", "--teacher-weights", "IMAGENET1K_V1", "--loss", "kd",
           *TINY], "predicts 1000 classes but the data has 3")
    # a checkpoint of another architecture names the first mismatching tensor
    stops(["--data-dir", data_dir, "--teacher", "mobilenetv1", "--teacher-ckpt", ckpt, "--loss", "kd", *TINY],
          "--teacher-ckpt .*: tensor 'model.0.0.weight' is missing")
    stops(["--data-dir", data_dir, "--eval-only", ckpt, "--model", "resnet34", *TINY],
          "--eval-only .*: tensor 'layer1.2.conv1.weight' is missing")
    stops(["--resume", *TINY], "--resume continues the run in --out; pass --out")


def test_unreadable_checkpoints_name_their_flag_and_file(data_dir, teacher_ckpt, tmp_path):
    """Missing, a folder, truncated, random bytes, empty, or a pickle that is no weights-only checkpoint: one line
    naming the flag and the file, for the teacher and for --eval-only (both read weights_only)."""
    ckpt, _ = teacher_ckpt
    with open(ckpt, "rb") as f:
        intact = f.read()
    files = {"truncated.pt": intact[:len(intact) // 2], "random.pt": os.urandom(4096), "empty.pt": b""}
    for name, data in files.items():
        with open(tmp_path / name, "wb") as f:
            f.write(data)
    torch.save({"model": {"fc.weight": torch.zeros(3, 2)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickle.pt")
    bad = {name: "is not a readable weights-only PyTorch checkpoint" for name in [*files, "pickle.pt"]}
    bad.update({"missing.pt": "is missing; pass a checkpoint file", "": "is a folder; pass a checkpoint file"})
    for name, problem in bad.items():
        path = str(tmp_path / name)
        stops(["--data-dir", data_dir, "--teacher", "resnet18", "--teacher-ckpt", path, "--loss", "kd", *TINY],
              f"--teacher-ckpt {re.escape(path)} {problem}")
        stops(["--data-dir", data_dir, "--model", "resnet18", "--eval-only", path, *TINY],
              f"--eval-only {re.escape(path)} {problem}")


def test_out_is_checked_before_any_data_is_read(teacher_ckpt, tmp_path):
    """A file as --out, a second run into a run's folder; --eval-only writes results.json only with --overwrite
    where one is (it never deletes a run's checkpoint or log)."""
    ckpt, _ = teacher_ckpt
    run = os.path.dirname(ckpt)   # the teacher's run: checkpoint.pt, log.jsonl, results.json
    (tmp_path / "file").write_text("x")
    nowhere = ["--data-dir", str(tmp_path / "nowhere"), "--model", "resnet18", *TINY]   # never read
    stops([*nowhere, "--out", str(tmp_path / "file")], "--out .*file is a file; pass a folder")
    stops([*nowhere, "--out", str(tmp_path / "file"), "--eval-only", ckpt], "--out .*file cannot be created")
    stops([*nowhere, "--out", str(tmp_path / "file" / "sub"), "--benchmark", "1"], "--out .*sub cannot be created")
    stops([*nowhere, "--out", run], "holds a run \\(checkpoint.pt, log.jsonl, results.json\\); pass --resume to "
          "continue it, --overwrite to start afresh, or another --out")
    stops([*nowhere, "--out", run, "--eval-only", ckpt], "holds results.json; pass --overwrite to replace it")
    stops([*nowhere, "--out", run, "--resume", "--lr", "0.3", "--seed", "5"], "--lr \\(0.4 there, 0.3 now\\), "
          "--seed \\(0 there, 5 now\\)")
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "log.jsonl", "results.json"]


def truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def test_an_unreadable_image_stops_the_run_with_its_path_or_is_skipped(teacher_ckpt, tmp_path):
    """By default the run stops with the image's path (from a DataLoader worker too), not "OSError: Truncated File
    Read"; with --skip-bad-images the next image replaces it and the epoch's log counts it."""
    ckpt, _ = teacher_ckpt
    root = make_image_tree(str(tmp_path / "data"), num_classes=NUM_CLASSES, per_class=4, size=40)
    bad_val = os.path.join(root, "val", "class_001", "0002.JPEG")
    truncate(bad_val)
    stops(["--data-dir", root, "--model", "resnet18", "--eval-only", ckpt, *TINY, "--workers", "1"],
          f"cannot read the image {re.escape(bad_val)} \\(OSError: .*\\); replace or delete it, or pass "
          "--skip-bad-images")
    bad_train = [os.path.join(root, "train", "class_000", "0001.JPEG"), os.path.join(root, "train", "class_002",
                                                                                     "0003.JPEG")]
    with open(bad_train[0], "wb") as f:
        f.write(os.urandom(2000))   # not an image
    open(bad_train[1], "wb").close()   # empty
    argv = ["--data-dir", root, "--model", "resnet18", "--epochs", "1", *TINY]
    stops([*argv, "--out", str(tmp_path / "stopped")], "cannot read the image (" +
          "|".join(map(re.escape, bad_train)) + ") \\(UnidentifiedImageError: ")
    assert os.listdir(tmp_path / "stopped") == []
    result = imagenet.main(imagenet.parse_args([*argv, "--out", str(tmp_path / "skipped"), "--skip-bad-images"]))
    (record,) = read_log(str(tmp_path / "skipped"))
    assert record["bad_images"] == 3 and record["train_images"] == 12 and result["images"] == 12


def test_progress_lines_inside_an_epoch(monkeypatch, capsys):
    """Rank 0 prints step, images/s and the ETAs every 30 s inside an epoch (a clock that moves 31 s per reading)."""
    clock = itertools.count(0.0, 31.0)
    monkeypatch.setattr(imagenet.time, "time", lambda: next(clock))
    imagenet.main(imagenet.parse_args(["--model", "resnet18", "--benchmark", "3", *TINY]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  step ")]
    assert [line.split()[1] for line in lines] == ["1/5", "2/5", "3/5", "4/5", "1/3", "2/3"]   # warm-up, then timed
    assert all("images/s  epoch ends in" in line and "the run in" in line for line in lines)


def test_a_failed_weights_download_stops_with_a_sentence(monkeypatch):
    """Offline or behind a proxy, --teacher-weights says what failed and what to do, instead of a urllib traceback."""
    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(imagenet.torchvision.models.ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    # --benchmark: ImageNet's 1000 classes without a data tree, so the class check passes and the download starts
    with pytest.raises(SystemExit, match="could not download torchvision's resnet18 IMAGENET1K_V1"):
        imagenet.main(imagenet.parse_args(["--model", "resnet18", "--teacher", "resnet18", "--teacher-weights",
                                           "IMAGENET1K_V1", "--loss", "kd", "--benchmark", "1", *TINY]))
