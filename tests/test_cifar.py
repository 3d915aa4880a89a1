"""Tests of cifar.py: the model zoo (sizes, published names), every loss, DDP evaluation, resume, errors, real data."""
import argparse
import functools
import json
import math
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cifar
import common
from conftest import ROOT, run_torchrun, syncs_per_step

# RepDistiller's models with 100 classes (counted from its model files)
PARAMS = {"resnet8": 83892, "resnet14": 181108, "resnet20": 278324, "resnet32": 472756, "resnet44": 667188,
          "resnet56": 861620, "resnet110": 1736564, "resnet8x4": 1233540, "resnet32x4": 7433860,
          "wrn_16_1": 180916, "wrn_16_2": 703284, "wrn_40_1": 569780, "wrn_40_2": 2255156, "vgg8": 3965028,
          "vgg11": 9277284, "vgg13": 9462180, "vgg16": 14774436, "vgg19": 20086692, "ShuffleV1": 949258,
          "ShuffleV2": 1355528, "MobileNetV2": 812836, "ResNet18": 11220132, "ResNet50": 23705252}

LOSSES = ["ce", "kd", "fitnet", "rkd", "reviewkd", "dkd", "augconf", "adaptconf"]
TINY = ["--dataset", "synthetic", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--train-subset", "32",
        "--test-subset", "33"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models gain little from a second thread, and two spinning threads slow down several-fold as soon as
    another process shares the two cores; one thread keeps the file's time predictable (~2 min). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    """A run without --out writes runs/<dataset>_..._seed<S>/ in the working directory: a fresh one per test."""
    monkeypatch.chdir(tmp_path)


def run(*argv):
    return cifar.main(cifar.parse_args([str(a) for a in argv]))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A resnet8 teacher for the 10 synthetic classes, saved the way mdistiller ships teachers ({"model": sd})."""
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    torch.manual_seed(1)
    torch.save({"model": cifar.build_model("resnet8", 10).state_dict(), "epoch": 240}, path)
    return str(path)


def test_every_model_has_the_published_parameter_count():
    assert set(cifar.MODELS) == set(PARAMS)
    for name, expected in PARAMS.items():
        model = cifar.build_model(name, 100)
        assert sum(p.numel() for p in model.parameters()) == expected, name


def test_features_call_returns_stage_maps_and_embedding():
    model = cifar.build_model("resnet8x4", 7).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, feats = model(x, features=True)
    assert torch.equal(logits, model(x)) and logits.shape == (2, 7)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
    assert torch.allclose(model.fc(feats[-1]), logits, atol=1e-6)   # the embedding is the classifier's input


def repdistiller_resnet8_keys(classes):
    """resnet8's state_dict names and shapes written out from RepDistiller's models/resnet.py (not from cifar.py)."""
    keys = {"conv1.weight": (16, 3, 3, 3)}
    bn = lambda prefix, c: {f"{prefix}.{k}": ((c,) if k != "num_batches_tracked" else ())
                            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    keys.update(bn("bn1", 16))
    cin = 16
    for layer, width in enumerate((16, 32, 64), start=1):
        p = f"layer{layer}.0"
        keys[f"{p}.conv1.weight"] = (width, cin, 3, 3)
        keys.update(bn(f"{p}.bn1", width))
        keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
        keys.update(bn(f"{p}.bn2", width))
        if layer > 1:
            keys[f"{p}.downsample.0.weight"] = (width, cin, 1, 1)
            keys.update(bn(f"{p}.downsample.1", width))
        cin = width
    keys.update({"fc.weight": (classes, 64), "fc.bias": (classes,)})
    return keys


# distinctive names and shapes of each family, read off the published model files
PUBLISHED = {
    "resnet8x4": {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
                  "fc.weight": (100, 256)},
    "wrn_16_1": {"block1.layer.0.bn1.running_var": (16,), "block2.layer.0.convShortcut.weight": (32, 16, 1, 1),
                 "block3.layer.1.conv2.weight": (64, 64, 3, 3), "bn1.weight": (64,), "fc.weight": (100, 64)},
    "vgg13": {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.1.running_mean": (64,),
              "block0.3.weight": (64, 64, 3, 3), "block4.4.weight": (512,), "classifier.weight": (100, 512)},
    "ShuffleV1": {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
                  "layer1.0.conv3.weight": (216, 18, 1, 1), "layer2.0.conv1.weight": (60, 80, 1, 1),
                  "linear.weight": (100, 960)},
    "ShuffleV2": {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.0.conv5.weight": (58, 58, 1, 1),
                  "layer1.1.conv2.weight": (58, 1, 3, 3), "conv2.weight": (1024, 464, 1, 1), "bn2.weight": (1024,),
                  "linear.weight": (100, 1024)},
    "MobileNetV2": {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                    "blocks.1.0.conv.0.weight": (48, 8, 1, 1), "blocks.6.0.conv.7.weight": (160,),
                    "conv2.0.weight": (1280, 160, 1, 1), "classifier.0.weight": (100, 1280)},
    "ResNet18": {"conv1.weight": (64, 3, 3, 3), "layer2.0.shortcut.0.weight": (128, 64, 1, 1),
                 "layer4.1.bn2.weight": (512,), "linear.weight": (100, 512)},
    "ResNet50": {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer1.0.conv3.weight": (256, 64, 1, 1),
                 "layer4.2.bn3.weight": (2048,), "linear.weight": (100, 2048)},
}


def test_state_dict_names_match_the_published_code():
    own = {k: tuple(v.shape) for k, v in cifar.build_model("resnet8", 100).state_dict().items()}
    assert own == repdistiller_resnet8_keys(100)
    for name, expected in PUBLISHED.items():
        own = {k: tuple(v.shape) for k, v in cifar.build_model(name, 100).state_dict().items()}
        for key, shape in expected.items():
            assert own.get(key) == shape, (name, key, own.get(key))


@pytest.mark.parametrize("wrap", ["model", "state_dict", "net", "bare"])
def test_published_checkpoint_loads_strictly(tmp_path, wrap):
    """A checkpoint built only from the published names (module.-prefixed, as saved from DataParallel) loads."""
    value = lambda k, shape: (torch.tensor(3) if not shape else torch.rand(shape) + 0.5 if k.endswith("running_var")
                              else torch.randn(shape) * 0.1)
    sd = {f"module.{k}": value(k, shape) for k, shape in repdistiller_resnet8_keys(10).items()}
    path = str(tmp_path / "ckpt.pth")
    torch.save(sd if wrap == "bare" else {wrap: sd, "epoch": 240}, path)
    model = cifar.build_model("resnet8", 10)
    cifar.load_weights(model, cifar.load_state_dict(path, "--teacher-ckpt"), "test")
    assert torch.equal(model.fc.weight, sd["module.fc.weight"])
    if wrap == "model":   # and through the script: as a teacher, and with --eval-only
        result = run(*TINY, "--model", "resnet8", "--loss", "kd", "--teacher", "resnet8", "--teacher-ckpt", path,
                     "--out", tmp_path / "kd")
        assert math.isfinite(result["top1"])
        result = run(*TINY, "--model", "resnet8", "--eval-only", path, "--out", tmp_path / "eval")
        assert result["images"] == 33
        with open(tmp_path / "eval" / "results.json") as f:
            assert json.load(f)["top1"] == result["top1"]


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_trains(tmp_path, teacher_ckpt, loss):
    teacher = [] if loss == "ce" else ["--teacher", "resnet8", "--teacher-ckpt", teacher_ckpt]
    out = tmp_path / loss
    run(*TINY, "--model", "wrn_16_1", "--loss", loss, *teacher, "--lr", "3.2", "--out", out)
    record = read_log(out)[-1]
    term = "loss_gt" if loss == "ce" else f"loss_{loss}"
    assert math.isfinite(record[term]) and record[term] > 0, record
    assert record["images"] == 33
    torch.manual_seed(0)   # the script seeds with --seed 0 right before building the student
    init = cifar.build_model("wrn_16_1", 10).state_dict()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not torch.equal(ckpt["model"]["fc.weight"], init["fc.weight"])
    if loss in ("fitnet", "reviewkd"):
        assert ckpt["heads"], "the feature loss's trainable heads must be saved for --resume"
    if loss == "adaptconf":   # Figure 3 data: β over the test set
        assert 0 < record["beta_mean"] <= 0.5 and 0 <= record["beta_frac_half"] <= 1
        assert len(record["beta_hist"]) == 10 and sum(record["beta_hist"]) == pytest.approx(1.0)
        assert record["beta_hist"][-1] >= record["beta_frac_half"]   # β = 0.5 falls in the last bin


def test_teacher_only_training_ignores_labels(tmp_path, teacher_ckpt):
    run(*TINY, "--model", "resnet8", "--loss", "adaptconf", "--teacher", "resnet8", "--teacher-ckpt", teacher_ckpt,
        "--gt-weight", "0", "--out", tmp_path)
    assert "loss_gt" not in read_log(tmp_path)[-1]
    with pytest.raises(cifar.UserError, match="needs labels"):
        run(*TINY, "--model", "resnet8", "--loss", "dkd", "--teacher", "resnet8", "--teacher-ckpt", teacher_ckpt,
            "--gt-weight", "0")
    # a feature loss alone would leave the classifier untrained: without labels it also learns the teacher's logits
    torch.manual_seed(0)   # the script seeds with --seed 0 right before building the student
    init = cifar.build_model("resnet8", 10).state_dict()
    run(*TINY, "--model", "resnet8", "--loss", "rkd", "--teacher", "resnet8", "--teacher-ckpt", teacher_ckpt,
        "--gt-weight", "0", "--out", tmp_path / "rkd")
    record = read_log(tmp_path / "rkd")[-1]
    assert "loss_gt" not in record and record["loss_kd"] > 0 and record["loss_rkd"] > 0
    trained = torch.load(tmp_path / "rkd" / "checkpoint.pt", weights_only=True)["model"]
    assert not torch.equal(trained["fc.bias"], init["fc.bias"])   # no weight decay on biases: only a gradient moves it


def test_synthetic_pipeline_learns(tmp_path):
    result = run("--dataset", "synthetic", "--model", "resnet8", "--epochs", "2", "--batch-size", "32",
                 "--train-subset", "512", "--test-subset", "200", "--lr", "3.2", "--warmup-epochs", "0",
                 "--augment", "classic", "--out", tmp_path)
    assert result["top1"] > 50, result   # 10 classes: chance is 10%
    assert os.path.isfile(tmp_path / "checkpoint.pt")


def test_augmentations():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    classic = cifar.augment(x, "classic", gen)
    # pad-4 crop + flip only moves pixels: every output row is a (possibly flipped) shifted copy or zero padding
    assert classic.shape == x.shape and torch.equal(classic, classic.round())
    centre = classic[:, :, 4:28, 4:28]
    assert all(any(torch.equal(centre[i], xs[:, 4 + dy:28 + dy, 4 + dx:28 + dx])
                   for dy in range(-4, 5) for dx in range(-4, 5) for xs in (x[i].float(), x[i].float().flip(2)))
               for i in range(8))
    replay = gen.clone_state()
    paper = cifar.augment(x, "paper", gen)
    assert paper.shape == x.shape and paper.min() >= 0 and paper.max() <= 255
    assert not torch.equal(paper, x.float())
    # random-resized-crop + flip from the same draws, per image and pixel in float64: the first of 10 tries (area
    # 8-100%, log-uniform aspect 3/4-4/3) that fits, else the whole image; bilinear, edges clamped
    rand = lambda *shape: torch.rand(*shape, generator=replay).double()
    flip, area, ratio = rand(64) < 0.5, rand(64, 10) * 0.92 + 0.08, torch.exp((rand(64, 10) * 2 - 1) * math.log(4 / 3))
    u, v = rand(64), rand(64)
    centre = (torch.arange(32, dtype=torch.float64) * 2 + 1) / 32 - 1   # output pixel centres in [-1, 1]
    for i in range(8):
        fits = [k for k in range(10) if max(area[i, k] * ratio[i, k], area[i, k] / ratio[i, k]) <= 1]
        w, h = ((area[i, fits[0]] * ratio[i, fits[0]]).sqrt(), (area[i, fits[0]] / ratio[i, fits[0]]).sqrt()) if fits \
            else (1.0, 1.0)
        sx = (((-1 if flip[i] else 1) * w * centre + (u[i] * 2 - 1) * (1 - w) + 1) * 32 - 1) / 2
        sy = ((h * centre + (v[i] * 2 - 1) * (1 - h) + 1) * 32 - 1) / 2
        sx, sy = sx.clamp(0, 31), sy.clamp(0, 31)
        x0, y0 = sx.floor().long().clamp(max=30), sy.floor().long().clamp(max=30)
        fx, fy, img = sx - x0, sy - y0, x[i].double()
        at = lambda dy, dx: img[:, (y0 + dy)[:, None], (x0 + dx)[None, :]]
        ref = (at(0, 0) * (1 - fy[:, None]) * (1 - fx) + at(0, 1) * (1 - fy[:, None]) * fx
               + at(1, 0) * fy[:, None] * (1 - fx) + at(1, 1) * fy[:, None] * fx)
        assert torch.allclose(paper[i].double(), ref, atol=1e-3), i


def test_torchrun_two_processes_count_every_test_image_once(tmp_path, teacher_ckpt):
    out = tmp_path / "ddp"
    proc = run_torchrun("cifar.py", ["--dataset", "synthetic", "--model", "wrn_16_1", "--loss", "fitnet",
                                     "--teacher", "resnet8", "--teacher-ckpt", teacher_ckpt, "--epochs", "1",
                                     "--warmup-epochs", "0", "--batch-size", "16", "--train-subset", "64",
                                     "--test-subset", "101", "--out", out])
    assert "global batch 32" in proc.stdout
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["images"] == 101 and read_log(out)[-1]["images"] == 101   # odd: padding would show
    # the summed counts equal a single-process evaluation of the same weights
    single = run("--dataset", "synthetic", "--test-subset", "101", "--model", "wrn_16_1",
                 "--eval-only", out / "checkpoint.pt")
    assert single["top1"] == pytest.approx(results["top1"]) and single["top5"] == pytest.approx(results["top5"])


@pytest.mark.parametrize("loss", ["adaptconf", "fitnet"])   # fitnet: its trainable regressors are resumed too
def test_resume_reproduces_an_uninterrupted_run(tmp_path, teacher_ckpt, loss):
    """A run stopped after epoch 1, then killed while writing epoch 2 (its log line written, a cut-off line after it,
    a half-written temporary checkpoint), resumed: the same weights, log and result as a run never stopped, and
    every checkpoint it wrote loads with weights_only=True."""
    args = [*TINY, "--train-subset", "48", "--epochs", "2", "--model", "resnet8", "--loss", loss,
            "--teacher", "resnet8", "--teacher-ckpt", teacher_ckpt, "--lr", "3.2"]
    full = run(*args, "--out", tmp_path / "full")
    cut = tmp_path / "cut"
    run(*args, "--out", cut, "--stop-after", "1")
    assert len(read_log(cut)) == 1
    with open(cut / "log.jsonl", "a") as f:
        f.write('{"epoch": 1, "loss": 99.0}\n{"epoch": 2, "lo')
    (cut / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    resumed = run(*args, "--out", cut, "--resume")
    assert not os.path.exists(cut / "checkpoint.pt.tmp")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "heads") if loss == "fitnet" else ("model",):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), (part, key)
    assert resumed["top1"] == full["top1"]
    assert [r["loss"] for r in read_log(cut)] == [r["loss"] for r in read_log(tmp_path / "full")]


def test_out_needs_resume_or_overwrite_and_resume_keeps_the_arguments(tmp_path, capsys):
    """A folder holding a run needs --resume or --overwrite; a resume with other arguments is refused naming them, a
    longer --epochs continues with a warning; --resume where no checkpoint is (a new folder, an empty one, one killed
    before its first checkpoint) starts afresh, so one command serves the first launch and every restart."""
    args = [*TINY, "--model", "resnet8"]
    out = tmp_path / "run"
    run(*args, "--out", out)
    with pytest.raises(cifar.UserError, match="holds a run.*--resume.*--overwrite"):
        run(*args, "--out", out)
    with pytest.raises(cifar.UserError) as refused:
        run(*args, "--out", out, "--resume", "--lr", "0.1", "--seed", "3")
    assert "--lr (0.2 there, 0.1 now)" in str(refused.value) and "--seed (0 there, 3 now)" in str(refused.value)
    assert len(read_log(out)) == 1   # refused runs leave the folder as it was
    capsys.readouterr()
    run(*args, "--out", out, "--resume", "--epochs", "2")
    assert "warning: --epochs 2 (was 1)" in capsys.readouterr().out and [r["epoch"] for r in read_log(out)] == [0, 1]
    run(*args, "--out", out, "--overwrite")
    assert "a fresh run" in capsys.readouterr().out and [r["epoch"] for r in read_log(out)] == [0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "log.jsonl").write_text('{"epoch": 0, "loss": 99.0}\n')
    for folder in ("new", "empty", "killed"):
        run(*args, "--out", tmp_path / folder, "--resume")
        assert "no checkpoint" in capsys.readouterr().out, folder
        assert [r["epoch"] for r in read_log(tmp_path / folder)] == [0] and read_log(tmp_path / folder)[0]["loss"] < 99
    (tmp_path / "file").write_text("")
    with pytest.raises(cifar.UserError, match="--out .*file is a file"):
        run(*args, "--out", tmp_path / "file")


def test_eval_only_and_benchmark_write_one_file_beside_a_run(tmp_path):
    """They never open the run in --out: each writes its own file there, replaced only with --overwrite."""
    out = tmp_path / "run"
    run(*TINY, "--model", "resnet8", "--out", out)
    log = read_log(out)
    bench = ["--benchmark", "1", "--model", "resnet8", "--batch-size", "8", "--out", out]
    run(*bench)
    with pytest.raises(cifar.UserError, match="holds benchmark.json; pass --overwrite"):
        run(*bench)
    run(*bench, "--overwrite")
    evaluate = [*TINY, "--model", "resnet8", "--eval-only", out / "checkpoint.pt"]
    with pytest.raises(cifar.UserError, match="holds results.json; pass --overwrite"):
        run(*evaluate, "--out", out)
    run(*evaluate, "--out", tmp_path / "eval")
    assert os.path.isfile(tmp_path / "eval" / "results.json") and read_log(out) == log
    with pytest.raises(cifar.UserError, match="does not combine"):
        run(*evaluate, "--out", out, "--resume")


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epochs", "-1"], ["--batch-size", "0"], ["--tau", "0"],
                                  ["--tau", "-1"], ["--tau", "nan"], ["--kd-T", "inf"], ["--lr", "0"],
                                  ["--train-subset", "-5"], ["--test-subset", "-1"], ["--gt-weight", "-1"],
                                  ["--epochs", "5", "--warmup-epochs", "5"], ["--alpha-max", "1.5"]])
def test_bad_numbers_are_refused_in_one_line_naming_the_flag(argv):
    with pytest.raises(cifar.UserError) as refused:
        cifar.parse_args(argv)
    message = str(refused.value)
    assert "error: " + argv[-2] in message and "\n" not in message, message


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "folder", "pickled code"])
def test_unreadable_checkpoint_is_one_line_naming_the_flag_and_file(tmp_path, teacher_ckpt, kind):
    path = tmp_path / "bad.pt"
    with open(teacher_ckpt, "rb") as f:
        data = f.read()
    if kind == "folder":
        path.mkdir()
    elif kind == "pickled code":   # anything but tensors and plain data could run code: weights_only refuses it
        torch.save({"model": torch.load(teacher_ckpt)["model"], "args": argparse.Namespace(lr=0.1)}, path)
    else:
        path.write_bytes({"truncated": data[:len(data) // 2], "random": np.random.default_rng(0).bytes(4096),
                          "empty": b""}[kind])
    for flags in (["--loss", "kd", "--teacher", "resnet8", "--teacher-ckpt", path], ["--eval-only", path]):
        with pytest.raises(cifar.UserError) as refused:
            run(*TINY, "--model", "resnet8", *flags)
        message = str(refused.value)
        assert f"{flags[-2]} {path} is " in message and "\n" not in message, message


def test_progress_line_inside_an_epoch(monkeypatch, capsys):
    progress = cifar.Progress(0, 4, 32, epochs_left=3, every=0)
    time.sleep(0.01)
    progress.step(1)
    line = capsys.readouterr().out
    assert line.startswith("  step 1/4  ") and "images/s  epoch ends in" in line and "the run in" in line, line
    cifar.Progress(1, 4, 32, every=0).step(1)   # only rank 0 prints, and nothing after the last step (the epoch line)
    cifar.Progress(0, 4, 32, every=0).step(4)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(cifar, "Progress", functools.partial(cifar.Progress, every=0))
    run(*TINY, "--model", "resnet8")   # 2 steps
    assert "  step 1/2  " in capsys.readouterr().out


def test_lr_schedule_warms_up_per_step_then_cosine_and_scales_with_the_global_batch():
    args = cifar.parse_args(["--epochs", "4", "--warmup-epochs", "1"])   # lr 0.2, min-lr 2e-3 at global batch 512
    steps, peak, final = 10, 0.2 * 1024 / 512, 2e-3 * 1024 / 512             # global batch 1024: both doubled
    lrs = [cifar.lr_at(args, step, steps, 1024) for step in range(4 * steps)]
    assert lrs[:10] == pytest.approx([peak * (s + 1) / 10 for s in range(10)])   # linear warm-up, step 9 at peak
    cosine = [final + 0.5 * (peak - final) * (1 + math.cos(math.pi * s / 30)) for s in range(30)]
    assert lrs[10:] == pytest.approx(cosine)   # from the peak at step 10 down towards --min-lr
    assert cifar.lr_at(args, 4 * steps, steps, 1024) == pytest.approx(final)


def test_missing_data_is_downloaded_or_stops_with_one_line_saying_where_to_put_it(tmp_path):
    """Offline (both proxies point at a closed port, so torchvision's attempt fails at once and nothing is fetched):
    one line naming the folder to fill and the torchvision command, exit 1, no traceback."""
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, https_proxy=dead, http_proxy=dead, HTTPS_PROXY=dead, HTTP_PROXY=dead, no_proxy="",
               NO_PROXY="")
    proc = subprocess.run([sys.executable, "cifar.py", "--data-dir", str(tmp_path), "--model", "resnet8", "--epochs",
                           "1", "--warmup-epochs", "0", "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert f"cifar100 is not in --data-dir {tmp_path} and could not be downloaded" in lines[0]
    assert f"{tmp_path}/cifar-100-python/" in lines[0] and "torchvision.datasets.CIFAR100(" in lines[0]
    assert not os.path.exists(tmp_path / "cifar-100-python")


def test_malformed_data_dir(tmp_path):
    broken = tmp_path / "cifar-100-python"
    broken.mkdir()
    for name in ("train", "test"):
        (broken / name).write_bytes(b"not a pickle")
    with pytest.raises(cifar.UserError, match="not a CIFAR python-pickle file"):
        run("--data-dir", tmp_path, "--model", "resnet8", "--epochs", "1", "--warmup-epochs", "0")


def test_unknown_model():
    with pytest.raises(SystemExit):
        cifar.parse_args(["--model", "resnet9"])
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        cifar.build_model("resnet9", 100)


def test_bad_teacher_checkpoint_names_the_tensor(tmp_path, teacher_ckpt):
    wrong_classes = str(tmp_path / "t100.pt")
    torch.save({"model": cifar.build_model("resnet8", 100).state_dict()}, wrong_classes)
    with pytest.raises(cifar.UserError, match=r"tensor 'fc.weight' has shape \(100, 64\)"):
        run(*TINY, "--model", "resnet8", "--loss", "kd", "--teacher", "resnet8", "--teacher-ckpt", wrong_classes)
    with pytest.raises(cifar.UserError, match="tensor 'conv1.weight' has shape"):   # resnet8 weights, resnet8x4
        run(*TINY, "--model", "resnet8", "--loss", "kd", "--teacher", "resnet8x4", "--teacher-ckpt", teacher_ckpt)
    with pytest.raises(cifar.UserError, match="resnet8 has no teacher in the paper's tables; pass --teacher"):
        run(*TINY, "--model", "resnet8", "--loss", "kd")   # parse_args stops before any data is read


def test_nan_loss_stops_the_run_before_its_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite in epoch 0"):
        run(*TINY, "--train-subset", "64", "--model", "resnet8", "--lr", "1e38", "--warmup-epochs", "0",
            "--out", tmp_path)
    assert not os.path.exists(tmp_path / "checkpoint.pt")   # the diverged epoch is never saved


def test_cifar10_dataset(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                         "labels": list(rng.integers(0, 10, 20))}, f)
    result = run("--dataset", "cifar10", "--data-dir", tmp_path, "--model", "resnet8", "--epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "50")
    assert result["images"] == 20


def test_benchmark_runs(tmp_path, capsys):
    result = run("--benchmark", "2", "--model", "resnet8", "--teacher", "resnet8", "--loss", "adaptconf",
                 "--batch-size", "8", "--out", tmp_path)
    assert result["images_per_s"] > 0 and "images/s" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "benchmark.json")


def test_training_steps_make_no_host_sync():
    """No .item/.tolist/bool/nonzero/masked_select/boolean-mask indexing per training step (augmentation, mixup,
    teacher, loss, optimizer), for every loss and every recipe: on the CPU nothing waits, so torch.cuda.set_sync_debug_mode
    would report nothing here, and counting the calls stands in for it (tests/test_gpu.py uses the mode on a GPU)."""
    for loss, recipe in [("ce", "classic"), ("adaptconf", "v1"), ("dkd", "v1"), *((loss, "paper") for loss in LOSSES)]:
        teacher = [] if loss == "ce" else ["--teacher", "resnet8"]
        argv = ["--model", "resnet8", *teacher, "--loss", loss, "--augment", recipe, "--batch-size", "8"]
        assert syncs_per_step(lambda steps: run(*argv, "--benchmark", steps)) == {}, loss


def test_shuffle_nets_keep_channels_last_and_the_head_runs_in_float32():
    """On CUDA the nets run channels_last under bf16 autocast: channel_shuffle keeps the layout (same values), and
    the classifier gives float32 logits from float32 features, as they set β (Eq. 2) and its statistics."""
    x = torch.randn(2, 6, 3, 4)
    reference = x.unflatten(1, (3, 2)).transpose(1, 2).flatten(1, 2)   # channels 0, 2, 4, 1, 3, 5
    for memory_format in (torch.contiguous_format, torch.channels_last):
        shuffled = cifar.channel_shuffle(x.contiguous(memory_format=memory_format), 3)
        assert torch.equal(shuffled, reference) and shuffled.is_contiguous(memory_format=memory_format)
    x = torch.randn(2, 3, 32, 32)
    for name in ("ShuffleV1", "ShuffleV2"):
        model = cifar.build_model(name, 10).eval()
        logits = model(x)
        model.to(memory_format=torch.channels_last)
        last, maps = model(x.contiguous(memory_format=torch.channels_last), features=True)
        assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps[:-1]), name
        assert torch.allclose(last, logits, atol=1e-5), name
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, feats = model(x, features=True)
        assert logits.dtype == feats[-1].dtype == torch.float32, name


def test_real_cifar100_weak_teacher_then_stronger_student(tmp_path, cifar100_dir):
    """A resnet8 teacher trained with ce on 4,000 real images, then a resnet14 student distilled from its checkpoint
    with adaptconf; both must beat chance (1%) clearly on 1,001 test images (measured: 7.4% and 6.8%)."""
    common = ["--data-dir", cifar100_dir, "--augment", "classic", "--train-subset", "4000", "--test-subset", "1001",
              "--epochs", "3", "--batch-size", "32", "--warmup-epochs", "0"]   # lr below: 0.2 and 0.1 at batch 32
    teacher = run(*common, "--lr", "3.2", "--model", "resnet8", "--loss", "ce", "--out", tmp_path / "teacher")
    student = run(*common, "--lr", "1.6", "--model", "resnet14", "--loss", "adaptconf", "--teacher", "resnet8",
                  "--teacher-ckpt", tmp_path / "teacher" / "checkpoint.pt", "--out", tmp_path / "student")
    assert teacher["images"] == student["images"] == 1001
    assert teacher["top1"] > 4.0 and student["top1"] > 4.0, (teacher["top1"], student["top1"])
    assert student["teacher_top1"] == pytest.approx(teacher["top1"])


def test_default_pairs_and_the_paper_numbers():
    """Without --teacher: Table 1's teacher of --model, else Table 2a's; ShuffleV1 -> resnet32x4 with neither flag.
    The teacher's cache folder is named after the data set, the teacher and its seed; the paper's number is looked up
    for the pair, the loss and labels or none (Table 2b)."""
    expected = {"resnet56": "resnet20", "resnet110": "resnet32", "resnet32x4": "resnet8x4", "wrn_40_2": "wrn_16_2",
                "vgg13": "vgg8", "ResNet50": "MobileNetV2"}
    for student, teacher in expected.items():
        args = cifar.parse_args(["--model", student, "--loss", "adaptconf"])
        assert (args.teacher, args.teacher_cache) == (teacher, f"runs/teachers/cifar100_{teacher}_seed0"), student
    args = cifar.parse_args(["--loss", "kd", "--teacher-seed", "2", "--dataset", "cifar10"])
    assert (args.model, args.teacher, args.teacher_cache) == ("resnet32x4", "ShuffleV1", "runs/teachers/cifar10_"
                                                                                         "ShuffleV1_seed2")
    assert cifar.parse_args(["--loss", "kd", "--teacher-ckpt", "t.pt"]).teacher_cache is None
    assert cifar.parse_args(["--model", "resnet56"]).teacher is None   # --loss ce: no teacher
    # no --out: a folder named after the run, continued when the same command runs again (--overwrite: afresh)
    args = cifar.parse_args(["--loss", "adaptconf", "--seed", "2"])
    assert (args.out, args.resume) == ("runs/cifar100_ShuffleV1-resnet32x4_adaptconf_seed2", True)
    args = cifar.parse_args(["--model", "resnet56", "--overwrite"])
    assert (args.out, args.resume, args.overwrite) == ("runs/cifar100_resnet56_ce_seed0", False, True)
    assert cifar.parse_args(["--benchmark", "2"]).out is None and cifar.parse_args(["--eval-only", "t.pt"]).out is None
    paper = lambda *argv: cifar.paper_top1(cifar.parse_args(list(argv[2:])), argv[0], argv[1])
    assert paper("resnet32x4", "adaptconf", "--loss", "adaptconf") == (80.99, "Table 2a")
    assert paper("resnet32x4", "adaptconf", "--loss", "adaptconf", "--gt-weight", "0") == (78.48, "Table 2b")
    assert paper("resnet32x4", "dkd", "--loss", "dkd", "--teacher", "resnet8x4") == (79.52, "Table 1")
    assert paper("vgg13", "fitnet", "--loss", "fitnet", "--teacher", "MobileNetV2", "--gt-weight", "0") == (
        70.57, "Table 2b")
    assert paper("ShuffleV1", "ce", "--loss", "kd") == (72.40, "Table 2a")   # the teacher's row
    assert paper("resnet56", "ce") == (72.94, "Table 1")                      # the student's row
    assert paper("resnet32x4", "adaptconf", "--loss", "adaptconf", "--tau", "2") == (None, None)   # Figure 2
    assert paper("resnet8", "ce") == paper("resnet56", "ce", "--dataset", "cifar10") == (None, None)


def test_mixup_draws_lambda_from_beta_0_1_on_the_device_generator():
    """λ of cifar_v1.yaml's mixup (α 0.1): Beta(0.1, 0.1) has mean 1/2 and variance 1/4.8 (uniform: 1/12); it is the
    first image's share of its soft target, and the same generator state gives the same λ."""
    gen, x, y = torch.Generator().manual_seed(0), torch.zeros(2, 3, 1, 1), torch.tensor([0, 1])
    lams = torch.tensor([cifar.mixup(x, y, 2, gen)[1][0, 0].item() for _ in range(4000)], dtype=torch.float64)
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 1 / 4.8) < 0.02, (lams.mean(), lams.var())
    assert 0 <= lams.min() and lams.max() <= 1


def test_v1_teacher_sees_the_students_augmented_mixed_images_and_the_targets_are_mixed(tmp_path):
    """One training step of --augment v1: the teacher's input is exactly the student's, and both equal the batched
    AutoAugment output (same generator draws; the policy itself is tested against PIL in tests/test_augment.py) mixed
    per image as timm's FastCollateMixup does (image i with B-1-i, float32, rounded), normalised; the ground-truth
    term is the soft-target cross-entropy with λ·onehot(y_i) + (1-λ)·onehot(y_{B-1-i}), from a slow per-image loop."""
    B = 8
    args = cifar.parse_args(["--dataset", "synthetic", "--model", "resnet8", "--teacher", "resnet8", "--loss", "kd",
                             "--augment", "v1", "--batch-size", str(B), "--epochs", "1", "--warmup-epochs", "0"])
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (2 * B, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (2 * B,), generator=gen)
    torch.manual_seed(0)
    net, teacher = cifar.build_model("resnet8", 10), cifar.build_model("resnet8", 10).eval().requires_grad_(False)
    seen = {}

    def keep(name, value):   # the first call of each hook; returning None, the hooks change nothing
        seen.setdefault(name, value)
    net.register_forward_pre_hook(lambda m, inputs: keep("student", inputs[0].clone()))
    net.register_forward_hook(lambda m, inputs, out: keep("logits", out[0].detach().double()))
    teacher.register_forward_pre_hook(lambda m, inputs: keep("teacher", inputs[0].clone()))
    model = cifar.Student(net)
    normalize = lambda v: (v - 120.0) / 60.0
    means = cifar.train_one_epoch(args, 0, model, teacher, torch.optim.SGD(model.parameters(), lr=0.1), x, y, 10,
                                  normalize, 0, 1, max_steps=1)
    # the same draws, replayed: the step's batch, the paper crop (test_augmentations) rounded to uint8 first, then
    # AutoAugment original-mstd0.5 filled with CIFAR-100's mean colour, translations up to int(0.45 x 32) pixels
    # (timm's create_transform), then λ from the two gamma draws
    idx = torch.randperm(2 * B, generator=cifar.seeded("shuffle", 0, 0))[:B]
    replay = cifar.seeded("augment", 0, 0, 0)
    crops = cifar.augment(x[idx], "paper", replay).round().to(torch.uint8)
    augmented = common.apply_augment_ops(crops, *common.auto_augment_draws(B, replay, magnitude_std=0.5),
                                         fill=(129, 124, 112), translate_const=14).float()
    gamma = torch._standard_gamma(torch.full((2,), 0.1, dtype=torch.float64), generator=replay)
    lam = float(gamma[0] / gamma.sum())
    images, targets = [], []
    for i in range(B):   # timm's FastCollateMixup, per image
        a, b = augmented[i].numpy().astype(np.float32), augmented[B - 1 - i].numpy().astype(np.float32)
        images.append(torch.from_numpy(np.rint(a * np.float32(lam) + b * np.float32(1 - lam))))
        targets.append([lam * (c == y[idx[i]]) + (1 - lam) * (c == y[idx[B - 1 - i]]) for c in range(10)])
    reference = normalize(torch.stack(images))
    assert torch.equal(seen["student"], seen["teacher"]) and torch.equal(seen["student"], reference)
    logp = torch.log_softmax(seen["logits"], 1)
    gt = -sum(sum(t * logp[i, c] for c, t in enumerate(row)) for i, row in enumerate(targets)) / B
    assert means["loss_gt"] == pytest.approx(float(gt), rel=1e-5)
    assert not torch.equal(augmented, cifar.augment(x[idx], "paper", cifar.seeded("augment", 0, 0, 0)).round())


def test_bare_command_trains_caches_reuses_and_resumes_the_teacher(tmp_path, cifar100_dir, monkeypatch, capsys):
    """`cifar.py --model resnet56 --loss adaptconf` with no teacher flags, on a real CIFAR-100 subset: the default
    teacher resnet20 is trained first with --loss ce in runs/teachers/cifar100_resnet20_seed0 (here: one killed after
    its first epoch, which is resumed, not restarted), then the student distils from it; a second student run reuses
    the finished teacher without training it again; a run with another recipe is refused, not mixed."""
    monkeypatch.chdir(tmp_path)
    common = ["--data-dir", cifar100_dir, "--train-subset", "32", "--test-subset", "20", "--batch-size", "16",
              "--epochs", "2", "--warmup-epochs", "0"]
    cache = tmp_path / "runs" / "teachers" / "cifar100_resnet20_seed0"
    run(*common, "--model", "resnet20", "--loss", "ce", "--stop-after", "1", "--out", cache)
    os.remove(cache / "results.json")   # as if killed during its second epoch
    capsys.readouterr()
    first = run(*common, "--model", "resnet56", "--loss", "adaptconf", "--out", "student0")
    out = capsys.readouterr().out
    assert "resnet56 <- resnet20 (adaptconf), no --teacher-ckpt: training the teacher first" in out
    assert "resuming runs/teachers/cifar100_resnet20_seed0 after epoch 1" in out
    assert [r["epoch"] for r in read_log(cache)] == [0, 1]
    with open(cache / "results.json") as f:
        trained = json.load(f)
    assert trained["epochs_done"] == 2 and (trained["paper_top1"], trained["paper_table"]) == (68.93, "Table 1")
    assert first["teacher_top1"] == pytest.approx(trained["top1"])
    assert (first["paper_top1"], first["paper_table"], first["teacher_paper_top1"]) == (74.17, "Table 1", 68.93)
    assert "teacher resnet20" in out and "student resnet56 (adaptconf)" in out and "74.17" in out
    log, stamp = (cache / "log.jsonl").read_bytes(), os.path.getmtime(cache / "checkpoint.pt")
    second = run(*common, "--model", "resnet56", "--loss", "adaptconf", "--seed", "1", "--out", "student1")
    assert "the teacher is the finished run in runs/teachers/cifar100_resnet20_seed0" in capsys.readouterr().out
    assert (cache / "log.jsonl").read_bytes() == log and os.path.getmtime(cache / "checkpoint.pt") == stamp
    assert second["teacher_top1"] == first["teacher_top1"]
    with open(tmp_path / "student1" / "results.json") as f:
        assert json.load(f)["best_top1"] == second["best_top1"] >= second["top1"]
    with pytest.raises(cifar.UserError, match=r"holds a teacher trained with other --epochs \(2 there, 3 now\)"):
        run(*[*common[:-4], "--epochs", "3", "--warmup-epochs", "0"], "--model", "resnet56", "--loss", "kd")


def test_without_out_the_results_are_kept_and_the_same_command_continues(cifar100_dir, capsys):
    """No --out: the run is kept in runs/<dataset>_<model>_<loss>_seed<S> (printed), with results.json; the same
    command again finds it finished, trains nothing and reports it again."""
    argv = ["--data-dir", cifar100_dir, "--train-subset", "32", "--test-subset", "20", "--batch-size", "16", "--epochs",
            "1", "--warmup-epochs", "0", "--model", "resnet20"]
    first = run(*argv)
    out = "runs/cifar100_resnet20_ce_seed0"
    assert f"{out}: a fresh run" in capsys.readouterr().out
    with open(f"{out}/results.json") as f:
        assert (json.load(f)["paper_top1"], first["paper_top1"]) == (68.93, 68.93)
    log = read_log(out)
    again = run(*argv)
    assert f"resuming {out} after epoch 1" in capsys.readouterr().out and read_log(out) == log
    assert again["top1"] == first["top1"] and again["best_top1"] == first["best_top1"]


def test_teacher_cache_is_reused_across_process_counts_and_refused_in_one_line(tmp_path, capsys):
    """The cache decision alone, on checkpoints written here (no training): a finished teacher of 8 x 8 images per
    step serves a 1 x 64 student; one from before --teacher-seed existed, or next to --eval-only's results.json,
    is reused too; an unfinished one on other processes, or a foreign file, is refused naming --teacher-cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    student = cifar.parse_args(["--model", "resnet56", "--loss", "kd", "--teacher-cache", str(cache)])
    trained = vars(cifar.parse_args(["--model", "resnet20", "--loss", "ce", "--out", str(cache), "--resume",
                                     "--batch-size", "8"]))
    save = lambda args, epoch: torch.save({"args": args, "epoch": epoch, "model": {}}, cache / "checkpoint.pt")
    save({**trained, "world_size": 8}, 240)
    (cache / "results.json").write_text(json.dumps({"top1": 60.0, "args": trained}))   # --eval-only's: no epochs_done
    assert cifar.train_teacher(student, 0) == str(cache / "checkpoint.pt")
    assert "the teacher is the finished run in" in capsys.readouterr().out
    save({k: v for k, v in trained.items() if k != "teacher_seed"} | {"world_size": 8}, 240)   # an older run
    assert cifar.train_teacher(student, 0) == str(cache / "checkpoint.pt")
    save({**trained, "world_size": 1}, 240)
    with pytest.raises(cifar.UserError, match=r"--teacher-cache .* holds a teacher trained with other --batch-size x "
                                              r"processes \(8 there, 64 now\); pass another --teacher-cache"):
        cifar.train_teacher(student, 0)
    save({**trained, "world_size": 8}, 100)
    with pytest.raises(cifar.UserError, match=r"holds an unfinished teacher trained with other --batch-size \(8 there, "
                                              r"64 now\), processes \(8 there, 1 now\); pass another --teacher-cache"):
        cifar.train_teacher(student, 0)
    torch.save({"state_dict": {}}, cache / "checkpoint.pt")
    with pytest.raises(cifar.UserError, match="checkpoint.pt was not written by this script; pass another "
                                              "--teacher-cache, or --teacher-ckpt"):
        cifar.train_teacher(student, 0)


def test_bare_command_under_torchrun_trains_one_teacher_all_ranks_use(tmp_path, cifar100_dir):
    """The same bare command on two processes: they train the teacher together (its run records 2 processes), then
    both distil from the one checkpoint: the teacher accuracy summed over both ranks equals a single-process
    evaluation of the cached checkpoint, which a later single-process run with the same global batch (1 x 32, not
    2 x 16) reuses without training."""
    common = ["--data-dir", cifar100_dir, "--model", "resnet56", "--loss", "adaptconf", "--train-subset", "32",
              "--test-subset", "21", "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0",
              "--teacher-cache", tmp_path / "teacher"]
    proc = run_torchrun("cifar.py", [*common, "--out", tmp_path / "student"])
    assert "training the teacher first" in proc.stdout and "global batch 32" in proc.stdout
    with open(tmp_path / "teacher" / "results.json") as f:
        teacher = json.load(f)
    with open(tmp_path / "student" / "results.json") as f:
        student = json.load(f)
    assert teacher["world_size"] == student["world_size"] == 2 and teacher["args"]["model"] == "resnet20"
    log = (tmp_path / "teacher" / "log.jsonl").read_bytes()
    again = run(*common, "--batch-size", "32", "--out", tmp_path / "again")   # the same global batch, 1 x 32
    assert (tmp_path / "teacher" / "log.jsonl").read_bytes() == log
    assert again["teacher_top1"] == pytest.approx(student["teacher_top1"]) == pytest.approx(teacher["top1"])
