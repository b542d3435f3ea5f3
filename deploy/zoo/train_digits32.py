"""Train RepVGG-Digits32 on scikit-learn's digits upsampled to 32x32 and write the shipped files.

    pip install scikit-learn
    python -m deploy.zoo.train_digits32               # writes deploy/zoo/data/{repvgg_digits32.pt,
                                                      #   digits32_test.npz, digits32_train.npz}
    python -m deploy.zoo.train_digits32 --out /tmp/d  # somewhere else

A standard recipe at small scale: AdamW with decoupled weight decay ``WEIGHT_DECAY`` on every parameter
(BatchNorm included), one-cycle schedule to ``LR`` (``WARMUP`` of the steps rising), batch ``BATCH``, ``EPOCHS``
epochs, BatchNorm in every branch, and every training digit augmented afresh each epoch
(:func:`deploy.zoo.digits32.augment`: rotation, scale, shift, noise). Deterministic: one CPU thread, seed 0, the
split of ``repvgg_digits``, so a rerun on the same torch build reproduces the weights. The weights are stored in
float16 (half the file; the held-out accuracy is measured with exactly those values).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .digits32 import CALIBRATION_IMAGES, CALIBRATION_SEED, DATA_DIR, TEST_SEED, RepVGGDigits32, augment
from .train_digits import accuracy, fit, load_split

SEED = 0
EPOCHS = 80
BATCH = 64
LR = 1e-2
WEIGHT_DECAY = 0.05
WARMUP = 0.1  # fraction of the steps


def train(out_dir: str | Path = DATA_DIR, epochs: int = EPOCHS, seed: int = SEED, log=print) -> dict:
    """Train, write ``repvgg_digits32.pt``, ``digits32_test.npz`` and ``digits32_train.npz`` (the INT8 calibration
    data) into ``out_dir``; return the training record."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x8_train, y_train, x8_test, y_test = load_split()
    x_test = augment(torch.from_numpy(x8_test), torch.Generator().manual_seed(TEST_SEED)).numpy()
    x_calib = augment(torch.from_numpy(x8_train[:CALIBRATION_IMAGES]),
                      torch.Generator().manual_seed(CALIBRATION_SEED)).numpy()
    g = torch.Generator().manual_seed(seed)
    model = RepVGGDigits32()
    seconds = fit(model, torch.from_numpy(x8_train), torch.from_numpy(y_train), augment, g, epochs=epochs, lr=LR,
                  weight_decay=WEIGHT_DECAY, warmup=WARMUP, evaluate=lambda: accuracy(model, x_test, y_test), log=log)
    # Shipped in float16 (half the file); the model holds exactly these values, and is evaluated with them.
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    meta = {
        "dataset": "sklearn.datasets.load_digits upsampled to 32x32, deploy.zoo.digits32.augment",
        "split": "train_test_split(test_size=0.2, stratify=labels, random_state=0)",
        "train_samples": int(len(x8_train)), "test_samples": int(len(x8_test)), "test_seed": TEST_SEED,
        "calibration_samples": CALIBRATION_IMAGES, "calibration_seed": CALIBRATION_SEED,
        "seed": seed, "epochs": epochs, "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY,
        "optimizer": "AdamW, one-cycle", "threads": 1,
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_seconds": round(seconds, 1), "weights": "float16 (loaded into float32 parameters)",
        "torch": str(torch.__version__),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": meta}, out / "repvgg_digits32.pt")
    np.savez_compressed(out / "digits32_test.npz", input0=x_test.astype(np.float16), labels=y_test)
    np.savez_compressed(out / "digits32_train.npz", input0=x_calib.astype(np.float16),
                        labels=y_train[:CALIBRATION_IMAGES])
    log(f"held-out accuracy {meta['test_accuracy']:.4f} ({len(x_test)} images) after {seconds:.0f} s of training; "
        f"wrote {out / 'repvgg_digits32.pt'}, {out / 'digits32_test.npz'} and {out / 'digits32_train.npz'}")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train RepVGG-Digits32 on upsampled, augmented digits (needs "
                                            "scikit-learn).")
    p.add_argument("--out", default=str(DATA_DIR), help=f"output directory (default {DATA_DIR})")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    train(args.out, args.epochs, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
