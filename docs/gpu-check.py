"""Helpers of docs/gpu-check.sh: the CUDA checks that CI (no GPU) can never run.

    python docs/gpu-check.py kather-shaped DIR     a folder shaped like ../shared/data/kather2016
    python docs/gpu-check.py step-bench OUT.json   training-step throughput, fp32/bf16 x layouts
    python docs/gpu-check.py same-weights A B      how far two checkpoints' weights differ

The Kather-shaped folder has the real set's classes, tile counts, 150 px tiles and groups,
filled with synthetic textures: it measures how long the recipe takes on a GPU, never how
accurate it is (the real tiles stay in ../shared/data and never travel).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

#: The real set's classes and tile counts (../shared/data/README.md).
KATHER_COUNTS = {"01_TUMOR": 494, "02_STROMA": 430, "03_COMPLEX": 427, "04_LYMPHO": 487,
                 "05_DEBRIS": 493, "06_MUCOSA": 493, "07_ADIPOSE": 496, "08_EMPTY": 464}
TILES_PER_SOURCE = 12  # the real tiles come from a few hundred source crops


def kather_shaped(root: Path) -> None:
    import pyvips

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:150, 0:150]
    rows = []
    for k, (label, count) in enumerate(KATHER_COUNTS.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        colour = np.array([200 - 12 * k, 120 + 8 * k, 180 - 5 * k])
        for i in range(count):
            period = 4 + 2 * k
            phase = rng.integers(0, period)
            pattern = (((xx + phase) // (period // 2)) % 2) if k % 2 else (((yy + phase) // (period // 2)) % 2)
            rgb = colour[None, None, :] - 60 * pattern[..., None] + rng.normal(0, 25, size=(150, 150, 3))
            rel = f"{label}/{i:04d}.png"
            pyvips.Image.new_from_array(np.clip(rgb, 0, 255).astype(np.uint8), interpretation="srgb").pngsave(
                str(root / rel))
            rows.append({"path": rel, "label": label, "source_image": f"{label}-src{i // TILES_PER_SOURCE}"})
    with open(root / "tiles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "source_image"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} tiles in {root}")


def step_bench(out: Path) -> None:
    """Images per second of the recipe's training steps (resnet18, batch 32, 8 classes):
    the teacher at 144 px, and distillation steps (teacher forward at 144 px, student
    forward and backward at 72, 36 or 18 px), in fp32 and bf16 autocast, each with the
    default and the channels-last memory layout."""
    import torch

    from lowmag.train.losses import DistillationLoss
    from lowmag.train.models import build_model

    import os

    device = torch.device(os.environ.get("GPU_CHECK_DEVICE", "cuda"))  # cpu: a dry run of this code
    timed = 60 if device.type == "cuda" else 1
    rows = []
    for student_px, batch in ((None, 32), ("big", 8), (72, 32), (36, 32), (18, 32)):
        for bf16 in (False, True):
            for channels_last in (False, True):
                torch.manual_seed(0)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                model = build_model("resnet18", 8).to(device).to(memory_format=fmt)
                opt = torch.optim.Adam(model.parameters(), lr=1e-4)
                teacher = None
                if isinstance(student_px, int):
                    teacher = build_model("resnet18", 8).to(device).to(memory_format=fmt).eval()
                loss_fn = DistillationLoss(4.0, "both", 1.0).to(device)
                side = 512 if student_px == "big" else 144  # "big": a whole tissue piece, batch 8
                big = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=fmt)
                small = big if not isinstance(student_px, int) else torch.nn.functional.interpolate(
                    big, size=(student_px, student_px), mode="area").contiguous(memory_format=fmt)
                labels = torch.randint(0, 8, (batch,), device=device)

                def step() -> None:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                        if teacher is None:
                            loss = torch.nn.functional.cross_entropy(model(big), labels)
                        else:
                            with torch.no_grad():
                                t_logits, t_feat = teacher.forward_with_features(big)
                            s_logits, s_feat = model.forward_with_features(small)
                            loss = loss_fn(s_logits.float(), s_feat.float(), t_logits.float(), t_feat.float()).total
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                for _ in range(10 if device.type == "cuda" else 1):
                    step()
                sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
                sync()
                n = timed
                began = time.perf_counter()
                for _ in range(n):
                    step()
                sync()
                seconds = (time.perf_counter() - began) / n
                name = {None: "teacher 144 px", "big": "teacher 512 px"}.get(student_px, f"distill {student_px} px")
                row = {"step": name, "batch": batch,
                       "bf16": bf16, "channels_last": channels_last, "ms_per_step": round(1000 * seconds, 2),
                       "images_per_s": round(batch / seconds)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    out.write_text(json.dumps({"gpu": name, "torch": torch.__version__,
                               "rows": rows}, indent=1))


def same_weights(a: Path, b: Path) -> None:
    from lowmag.train.models import read_state_dict

    first, second = read_state_dict(a), read_state_dict(b)
    diffs = {k: float((first[k].float() - second[k].float()).abs().max()) for k in first}
    worst = max(diffs, key=diffs.get)
    print(json.dumps({"tensors": len(diffs), "identical": sum(v == 0 for v in diffs.values()),
                      "max_abs_diff": diffs[worst], "worst_tensor": worst}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"kather-shaped": lambda: kather_shaped(Path(args[0])),
     "step-bench": lambda: step_bench(Path(args[0])),
     "same-weights": lambda: same_weights(Path(args[0]), Path(args[1]))}[command]()
