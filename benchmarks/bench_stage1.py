"""Stage-1 throughput (issue 14): training images per second of the CIFAR-LT presets' encoder recipe.

One stage-1 optimiser step = crop/flip augmentation on the device, ResNet-32 forward/backward on a batch of
128 images of 3×32×32, SGD with momentum — what `pfdiff run cifar10lt` repeats 200 epochs × 97 steps
(CIFAR-10-LT at IF = 100 has 12 406 training images). Also the 1-D CNN of `ltbench` on MNIST-1D signals.
Timed after warm-up, on the CPU and on every CUDA device present. Writes benchmarks/results/stage1.json.
Run: .venv/bin/python benchmarks/bench_stage1.py [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from pfdiff.config import load_config
from pfdiff.longtail.common import augmenter
from pfdiff.models import create_classifier, create_encoder
from pfdiff.runs import atomic_write_json

OUT = Path(__file__).parent / "results" / "stage1.json"


def images_per_second(preset: str, input_shape: tuple[int, ...], device: torch.device, steps: int) -> dict:
    cfg = load_config(preset)
    m, o = cfg.model, cfg.stage1
    enc = create_encoder(m.encoder, input_shape, m.feature_dim, m.width).to(device)
    clf = create_classifier(m.classifier, enc.feature_dim, 10).to(device)
    params = list(enc.parameters()) + list(clf.parameters())
    opt = (torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay) if o.optimizer == "sgd"
           else torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay))
    augment = augmenter(o, input_shape)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand((o.batch_size, *input_shape), generator=g, device=device)
    y = torch.randint(0, 10, (o.batch_size,), generator=g, device=device)

    def step(i: int) -> None:
        xb = augment(x, 0, i) if augment else x
        loss = nn.functional.cross_entropy(clf(enc(xb)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(2):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec = (time.perf_counter() - t0) / steps
    return {"preset": preset, "encoder": m.encoder, "input_shape": list(input_shape), "batch": o.batch_size,
            "optimizer": o.optimizer, "augment": o.augment, "ms_per_step": 1000 * sec,
            "images_per_second": o.batch_size / sec}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    rows = []
    for device in devices:
        for preset, shape in (("cifar10lt", (3, 32, 32)), ("ltbench", (1, 40))):
            r = images_per_second(preset, shape, device, args.steps)
            r["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
            rows.append(r)
            print(f"{r['device']:>12s} {preset:10s} {r['encoder']:9s} {r['ms_per_step']:8.1f} ms/step "
                  f"{r['images_per_second']:9.0f} images/s")
    atomic_write_json(OUT, {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "load_average_1m": os.getloadavg()[0], "rows": rows,
                            "cifar10lt_epoch_seconds_cpu": 12406 / rows[0]["images_per_second"]})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
