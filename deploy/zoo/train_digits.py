"""Train RepVGG-Digits on scikit-learn's handwritten digits and write the shipped files.

    pip install scikit-learn
    python -m deploy.zoo.train_digits                 # writes deploy/zoo/data/{repvgg_digits.pt,
                                                      #   digits_test.npz, digits_train.npz}
    python -m deploy.zoo.train_digits --out /tmp/d    # somewhere else

Deterministic: one CPU thread, seed 0, a fixed stratified 80/20 split (``random_state=0``), so a
rerun reproduces the same split and (on the same torch build) the same weights. Training: AdamW
(lr 3e-3, weight decay 1e-4), one-cycle schedule, batch 64, 40 epochs, each image shifted by up to
one pixel at random; about 10 seconds on one core. The checkpoint holds ``state_dict`` and
``meta`` (seed, epochs, split sizes, held-out accuracy).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .digits import DATA_DIR, RepVGGDigits

SEED = 0
EPOCHS = 40
BATCH = 64
LR = 3e-3


def load_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels); images ``(N, 1, 8, 8)`` float32 in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit("training RepVGG-Digits needs scikit-learn; install it with pip install scikit-learn") from e
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, stratify=labels,
                                                        random_state=seed)
    return x_train, y_train, x_test, y_test


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in each direction (zero fill)."""
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=g)
    rows = (torch.arange(8)[None, :] + dy[:, None])[:, :, None].expand(-1, 8, 8)
    cols = (torch.arange(8)[None, :] + dx[:, None])[:, None, :].expand(-1, 8, 8)
    batch = torch.arange(x.shape[0])[:, None, None].expand(-1, 8, 8)
    return padded[batch, 0, rows, cols][:, None]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, transform, g: torch.Generator, *, epochs: int,
        lr: float, weight_decay: float, warmup: float, evaluate, log=print) -> float:
    """Train ``model`` on ``(x, y)`` with AdamW (decoupled ``weight_decay`` on every parameter) under a one-cycle
    schedule to ``lr`` (``warmup`` of the steps rising), batches of ``BATCH`` in an order drawn from ``g``, each
    batch passed through ``transform(batch, g)`` (the augmentation); logs the loss and ``evaluate()`` every 10
    epochs. Returns the seconds it took."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            loss = F.cross_entropy(model(transform(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            log(f"epoch {epoch + 1:3d}  loss {total / len(x):.4f}  held-out accuracy {evaluate():.4f}  "
                f"{time.perf_counter() - start:.0f} s")
    model.eval()
    return time.perf_counter() - start


def train(out_dir: str | Path = DATA_DIR, epochs: int = EPOCHS, seed: int = SEED, log=print) -> dict:
    """Train, write ``repvgg_digits.pt``, ``digits_test.npz`` and ``digits_train.npz`` (the INT8 calibration data)
    into ``out_dir``; return the training record."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = load_split(seed)
    model = RepVGGDigits()
    seconds = fit(model, torch.from_numpy(x_train), torch.from_numpy(y_train), _shift, g, epochs=epochs, lr=LR,
                  weight_decay=1e-4, warmup=0.15, evaluate=lambda: accuracy(model, x_test, y_test), log=log)
    meta = {
        "dataset": "sklearn.datasets.load_digits, 8x8 grey levels / 16",
        "split": "train_test_split(test_size=0.2, stratify=labels, random_state=0)",
        "train_samples": int(len(x_train)), "test_samples": int(len(x_test)),
        "seed": seed, "epochs": epochs, "batch": BATCH, "lr": LR,
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, x_test, y_test),
        "torch": str(torch.__version__),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, out / "repvgg_digits.pt")
    np.savez_compressed(out / "digits_test.npz", input0=x_test, labels=y_test)
    np.savez_compressed(out / "digits_train.npz", input0=x_train, labels=y_train)
    log(f"held-out accuracy {meta['test_accuracy']:.4f} ({len(x_test)} images) after "
        f"{seconds:.1f} s of training; wrote {out / 'repvgg_digits.pt'}, {out / 'digits_test.npz'} "
        f"and {out / 'digits_train.npz'}")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train RepVGG-Digits on scikit-learn's digits (needs scikit-learn).")
    p.add_argument("--out", default=str(DATA_DIR), help=f"output directory (default {DATA_DIR})")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    train(args.out, args.epochs, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
