"""CUDA smoke tests, skipped without a GPU: on a GPU machine `python -m pytest -q tests/test_gpu.py` runs every
script's training step on CUDA with bf16 autocast and channels_last (the scripts' CUDA defaults), runs an evaluation
there, and checks with torch.cuda.set_sync_debug_mode that no step makes the host wait for the GPU.

The CPU tests count the same operations by hand (conftest.count_host_syncs); here the CUDA runtime itself reports every
synchronising call, host-to-device copies included."""
import json
import warnings

import pytest
import torch

import cifar
import fewshot
import imagenet
import noisy
import transfer
from conftest import make_image_tree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_syncs_per_step(script, argv, few=2, more=4):
    """Synchronising CUDA calls per extra training step: `--benchmark few` and `--benchmark more` (the ordinary
    training loop) under set_sync_debug_mode("warn"); the reads at the start and end of the loop cancel."""
    counts = []
    for steps in (few, more):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = script.main(script.parse_args([*map(str, argv), "--benchmark", str(steps)]))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert result["images_per_s"] > 0
        counts.append(sum("synchronizing" in str(w.message) for w in caught))
    return (counts[1] - counts[0]) / (more - few)


STEPS = {
    "cifar adaptconf": (cifar, ["--model", "resnet32x4", "--teacher", "ShuffleV1", "--loss", "adaptconf",
                                "--batch-size", "128"]),
    "cifar v1": (cifar, ["--model", "resnet32x4", "--teacher", "ShuffleV1", "--loss", "adaptconf", "--augment", "v1",
                         "--batch-size", "128"]),
    "cifar dkd": (cifar, ["--model", "resnet56", "--teacher", "resnet20", "--loss", "dkd", "--batch-size", "128"]),
    "cifar rkd": (cifar, ["--model", "resnet56", "--teacher", "resnet20", "--loss", "rkd", "--batch-size", "128"]),
    "cifar reviewkd": (cifar, ["--model", "resnet56", "--teacher", "resnet20", "--loss", "reviewkd",
                               "--batch-size", "128"]),
    "imagenet adaptconf": (imagenet, ["--model", "resnet50", "--teacher", "mobilenetv1", "--loss", "adaptconf",
                                      "--batch-size", "32", "--workers", "2"]),
    "imagenet fitnet": (imagenet, ["--model", "resnet34", "--teacher", "resnet18", "--loss", "fitnet",
                                   "--batch-size", "32", "--workers", "2"]),
    "transfer adaptconf": (transfer, ["--model", "vit_base_patch16", "--teacher", "resnet50", "--loss", "adaptconf",
                                      "--batch-size", "16", "--workers", "2"]),
    "fewshot classifier": (fewshot, ["--stage", "classifier", "--model", "resnet36", "--teacher", "resnet12",
                                     "--loss", "adaptconf", "--batch-size", "64"]),
    "fewshot meta": (fewshot, ["--stage", "meta", "--model", "resnet36", "--teacher", "resnet12",
                               "--loss", "adaptconf"]),
    "noisy adaptconf": (noisy, ["--dataset", "cifar100", "--model", "preact_resnet34", "--teacher", "preact_resnet18",
                                "--loss", "adaptconf", "--batch-size", "128"]),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_training_steps_run_on_cuda_without_host_syncs(name):
    script, argv = STEPS[name]
    assert cuda_syncs_per_step(script, argv) == 0


def test_cifar_trains_and_evaluates_on_cuda_like_on_the_cpu(tmp_path):
    """One real epoch on the GPU (bf16, channels_last), then its checkpoint evaluated on the GPU in float32 and on the
    CPU: with TF32 off in evaluation both count the same images correct."""
    out = tmp_path / "run"
    result = cifar.main(cifar.parse_args(["--dataset", "synthetic", "--model", "resnet8", "--epochs", "1",
                                          "--warmup-epochs", "0", "--batch-size", "64", "--out", str(out)]))
    assert result["images"] == 1000 and result["top1"] > 20   # 10 classes
    with open(out / "log.jsonl") as f:
        assert json.loads(f.readline())["loss"] > 0
    gpu = cifar.main(cifar.parse_args(["--dataset", "synthetic", "--model", "resnet8", "--eval-only",
                                       str(out / "checkpoint.pt")]))
    available = torch.cuda.is_available
    try:
        torch.cuda.is_available = lambda: False
        cpu = cifar.main(cifar.parse_args(["--dataset", "synthetic", "--model", "resnet8", "--eval-only",
                                           str(out / "checkpoint.pt")]))
    finally:
        torch.cuda.is_available = available
    assert gpu["top1"] == pytest.approx(cpu["top1"], abs=0.11)   # at most one of 1,000 images may flip
    # the logits themselves, on images the net has not seen (the accuracy alone may be 100% on both)
    model = cifar.build_model("resnet8", 10).eval()
    cifar.load_weights(model, cifar.load_state_dict(str(out / "checkpoint.pt"), "--eval-only"), "checkpoint")
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = model(x)
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):
            on_gpu = model.cuda().to(memory_format=torch.channels_last)(x.cuda()).cpu()
    assert torch.allclose(on_gpu, on_cpu, atol=1e-4, rtol=1e-4), (on_gpu - on_cpu).abs().max()


def test_imagenet_and_transfer_evaluate_on_cuda(tmp_path):
    """A tiny ImageFolder tree through imagenet.py's and transfer.py's real loaders, one epoch each on the GPU."""
    root = make_image_tree(str(tmp_path / "tree"), num_classes=3, per_class=8, size=64)
    result = imagenet.main(imagenet.parse_args(["--data-dir", root, "--model", "resnet18", "--loss", "ce",
                                                "--epochs", "1", "--batch-size", "8", "--image-size", "64",
                                                "--workers", "1"]))
    assert result["images"] == 24
    result = transfer.main(transfer.parse_args(["--data-dir", root, "--model", "vit_tiny_test", "--loss", "ce",
                                                "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
                                                "--image-size", "64", "--workers", "1"]))
    assert result["images"] == 24
