"""imagenet.py on CPU with tiny generated ImageFolder trees: models, feature shapes, train → distil → evaluate,
a real two-process torchrun, exact resume, the benchmark on synthetic images, and the errors people hit first."""
import json
import os

import pytest
import torch

import imagenet
from conftest import make_image_tree, run_torchrun, syncs_per_step

# 3 classes; 4 training images per class (3 steps of 4), 5 validation images per class: 15, an odd count that
# two processes cannot split evenly, so padding or double counting would show
NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 4, 5
TINY = ["--image-size", "32", "--batch-size", "4", "--workers", "0", "--lr", "0.4"]


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


def refused(argv, capsys):
    """parse_args refuses `argv`: returns argparse's message."""
    with pytest.raises(SystemExit):
        imagenet.parse_args(argv)
    return capsys.readouterr().err


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


def test_feature_heads_map_student_onto_teacher_shapes():
    args = loss_args("reviewkd")
    student = imagenet.MODELS["resnet50"](num_classes=5)
    teacher = imagenet.MODELS["mobilenetv1"](num_classes=5).eval()
    model = imagenet.StudentWithHead(student, imagenet.build_head(args, student, teacher), args.fitnet_stage)
    x = torch.randn(2, 3, 32, 32)
    _, t_feats, t_pooled = imagenet.forward_features(teacher, x)
    fused = model(x)[3]
    assert [f.shape for f in fused] == [f.shape for f in t_feats] + [(2, 1024, 1, 1)]
    args = loss_args("fitnet")
    model = imagenet.StudentWithHead(student, imagenet.build_head(args, student, teacher), args.fitnet_stage)
    assert model(x)[3].shape == t_feats[1].shape == (2, 256, 4, 4)


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
                                 "--image-size", "32", "--batch-size", "4", "--workers", "1"], nproc=2)
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


def test_resume_reproduces_an_uninterrupted_run(data_dir, teacher_ckpt, tmp_path):
    ckpt, _ = teacher_ckpt
    base = ["--data-dir", data_dir, "--model", "resnet18", "--teacher", "resnet18", "--teacher-ckpt", ckpt,
            "--loss", "fitnet", *TINY]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    imagenet.main(imagenet.parse_args([*base, "--epochs", "2", "--out", full]))
    imagenet.main(imagenet.parse_args([*base, "--epochs", "1", "--out", split]))
    imagenet.main(imagenet.parse_args([*base, "--epochs", "2", "--out", split, "--resume"]))
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=False)
    for part in ("model", "head"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part} tensor {name} differs after resume"
    assert [r["epoch"] for r in read_log(split)] == [0, 1]
    assert read_log(split)[1]["loss"] == read_log(full)[1]["loss"]
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
    assert imagenet.main(imagenet.parse_args(["--model", "resnet18", "--benchmark", "1", *TINY]))["ms_per_step"] > 0
    assert "distils from a teacher" in refused(["--loss", "kd", "--benchmark", "1"], capsys)


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


def test_arguments_are_checked_before_any_data_is_read(tmp_path, capsys):
    assert "needs labels" in refused(["--loss", "ce", "--gt-weight", "0"], capsys)
    assert "needs labels" in refused(["--loss", "dkd", "--teacher", "resnet18", "--teacher-ckpt", "t.pt",
                                      "--gt-weight", "0"], capsys)
    assert "pass --teacher and exactly one" in refused(["--loss", "adaptconf"], capsys)
    assert "pass --teacher and exactly one" in refused(["--loss", "kd", "--teacher", "resnet18", "--teacher-ckpt",
                                                        "t.pt", "--teacher-weights", "IMAGENET1K_V1"], capsys)
    assert "has no weights 'IMAGENET1K_V9'" in refused(["--teacher", "resnet18", "--teacher-weights",
                                                        "IMAGENET1K_V9", "--loss", "kd"], capsys)
    assert "no weights 'IMAGENET1K_V1' for mobilenetv1" in refused(["--teacher", "mobilenetv1", "--teacher-weights",
                                                                    "IMAGENET1K_V1", "--loss", "kd"], capsys)
    assert "must be positive" in refused(["--tau", "0"], capsys)
    assert "--resume continues" in refused(["--resume"], capsys)
    assert "--resume continues" in refused(["--resume", "--out", str(tmp_path)], capsys)   # no checkpoint there
    refused(["--model", "resnet1001"], capsys)   # argparse refuses unknown models by name


def test_bad_inputs_stop_with_a_sentence(data_dir, teacher_ckpt, tmp_path):
    ckpt, _ = teacher_ckpt
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        imagenet.main(imagenet.parse_args(["--data-dir", str(tmp_path / "nowhere"), *TINY]))
    make_image_tree(str(tmp_path / "no_train"), splits=("val",), num_classes=2, per_class=1, size=8)
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        imagenet.main(imagenet.parse_args(["--data-dir", str(tmp_path / "no_train"), *TINY]))
    # val/ exists with class folders, train/ exists but holds no images
    empty = tmp_path / "empty"
    make_image_tree(str(empty), splits=("val",), num_classes=2, per_class=1, size=8)
    os.makedirs(empty / "train" / "class_000")
    with pytest.raises(FileNotFoundError, match="holds no class folders with images"):
        imagenet.main(imagenet.parse_args(["--data-dir", str(empty), *TINY]))
    # a teacher trained on 3 classes cannot teach on 4
    four = str(tmp_path / "four")
    make_image_tree(four, num_classes=4, per_class=2, size=8)
    with pytest.raises(SystemExit, match="predicts 3 classes but the data has 4"):
        imagenet.main(imagenet.parse_args(["--data-dir", four, "--model", "resnet18", "--teacher", "resnet18",
                                           "--teacher-ckpt", ckpt, "--loss", "kd", *TINY]))
    # train/ and val/ disagree on the classes
    mixed = str(tmp_path / "mixed")
    make_image_tree(mixed, splits=("train",), num_classes=3, per_class=2, size=8)
    make_image_tree(mixed, splits=("val",), num_classes=2, per_class=2, size=8)
    with pytest.raises(ValueError, match="train/ has 3 classes and val/ has 2"):
        imagenet.main(imagenet.parse_args(["--data-dir", mixed, *TINY]))
    # torchvision weights: 1000 ImageNet classes (checked offline, before any download)
    with pytest.raises(SystemExit, match="predicts 1000 classes but the data has 3"):
        imagenet.main(imagenet.parse_args(["--data-dir", data_dir, "--teacher", "resnet18", "--teacher-weights",
                                           "IMAGENET1K_V1", "--loss", "kd", *TINY]))
    # a checkpoint of another architecture names the first mismatching tensor
    with pytest.raises(ValueError, match="tensor 'model.0.0.weight' is missing"):
        imagenet.main(imagenet.parse_args(["--data-dir", data_dir, "--teacher", "mobilenetv1", "--teacher-ckpt",
                                           ckpt, "--loss", "kd", *TINY]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        imagenet.main(imagenet.parse_args(["--data-dir", data_dir, "--teacher", "resnet18", "--teacher-ckpt",
                                           str(tmp_path / "missing.pt"), "--loss", "kd", *TINY]))


def test_a_failed_weights_download_stops_with_a_sentence(monkeypatch):
    """Offline or behind a proxy, --teacher-weights says what failed and what to do, instead of a urllib traceback."""
    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(imagenet.torchvision.models.ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    # --benchmark: ImageNet's 1000 classes without a data tree, so the class check passes and the download starts
    with pytest.raises(SystemExit, match="could not download torchvision's resnet18 IMAGENET1K_V1"):
        imagenet.main(imagenet.parse_args(["--model", "resnet18", "--teacher", "resnet18", "--teacher-weights",
                                           "IMAGENET1K_V1", "--loss", "kd", "--benchmark", "1", *TINY]))
