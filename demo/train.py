"""Train vgg-shapes (lrp_module/demo_model.py) on the generated shapes, or vgg-shapes-hans on shapes-hans (the
planted Clever Hans), seeded, on the CPU in a few minutes, and write the weights and their record (sha256,
classes, seed, epochs, accuracy; for vgg-shapes-hans also how much it relies on the tag) to lrp_module/weights/.

Images pass through the same JPEG bytes and the same preprocessing as the pipeline's (resize to 256/224 of the
size, centre crop, ImageNet normalisation: pipeline/preprocess.py), so the pipeline sees what training saw.

    python -m demo.train                          # `make train-demo`
    python -m demo.train --model vgg-shapes-hans  # `make train-demo-hans`
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from lrp_module import demo_model
from lrp_module.files import sha256_file
from lrp_module.weights_recipe import IMAGENET_HIGH, IMAGENET_LOW
from pipeline.preprocess import Preprocessing, decode, preprocess

from . import shapes, shapes_hans
from .hans_effect import measure

TRAIN_PER_CLASS = 1000
EPOCHS = 20
BATCH = 32
LEARNING_RATE = 3e-3
PRINT = partial(print, flush=True)  # training's default log: lines appear as they are written
SEED = 0


@dataclass(frozen=True)
class Recipe:
    """What one demo model is trained on and how: the generator, its sizes and the augmentations."""

    make_sample: Callable[[int, int], shapes.ShapeSample]
    per_class: int
    val_per_class: int
    epochs: int
    flips: bool  # horizontal flips (every shape is mirror-symmetric)
    noise: bool  # noise patches (pixel flipping's perturbation is no evidence)
    command: str


RECIPES = {
    demo_model.NAME: Recipe(shapes.make_sample, TRAIN_PER_CLASS, shapes.VAL_PER_CLASS, EPOCHS, True, True,
                            "make train-demo (python -m demo.train)"),
    # Fewer images and epochs: the tag is learned in the first epoch, and the shapes well enough in 10. No flips
    # (they would move the tag to the other corner) and no noise patches (they would sometimes hide it).
    demo_model.HANS_NAME: Recipe(shapes_hans.make_sample, 500, shapes_hans.VAL_PER_CLASS, 10, False, False,
                                 "make train-demo-hans (python -m demo.train --model vgg-shapes-hans)"),
}


def tensors(seed: int, per_class: int, make_sample: Callable[[int, int], shapes.ShapeSample] = shapes.make_sample
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated images as the pipeline sees them (N, 3, 64, 64) and their labels (N,)."""
    steps = Preprocessing.for_size(shapes.IMAGE_SIZE)  # the pipeline's own
    images, labels = [], []
    for index in range(per_class * len(shapes.CLASSES)):
        sample = make_sample(seed, index)
        tensor, _ = preprocess(decode(shapes.jpeg_bytes(sample.image)), (), steps)
        images.append(tensor)
        labels.append(sample.label)
    return torch.stack(images), torch.tensor(labels)


def noise_patches(x: torch.Tensor, generator: torch.Generator, most: int = 16) -> torch.Tensor:
    """Half the images get 1..`most` square patches (4-12 px, anywhere) of uniform noise over the pixel range, the
    perturbation of pixel flipping (pipeline/faithfulness.py): the network learns that noise is no evidence for any
    class, so that covering the shape, not covering anything, is what lowers its score, and AOPC measures the map."""
    n, channels, h, w = x.shape
    low = torch.tensor(IMAGENET_LOW).view(channels, 1, 1)
    high = torch.tensor(IMAGENET_HIGH).view(channels, 1, 1)
    x = x.clone()
    for i in torch.nonzero(torch.rand(n, generator=generator) < 0.5).flatten().tolist():
        for _ in range(int(torch.randint(1, most + 1, (1,), generator=generator))):
            size = int(torch.randint(4, 13, (1,), generator=generator))
            top, left = (int(torch.randint(0, extent - size + 1, (1,), generator=generator)) for extent in (h, w))
            noise = torch.rand((channels, size, size), generator=generator) * (high - low) + low
            x[i, :, top:top + size, left:left + size] = noise
    return x


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(batch).argmax(1) for batch in images.split(256)])
    return float((predicted == labels).float().mean())


def train(per_class: int = TRAIN_PER_CLASS, epochs: int = EPOCHS, seed: int = SEED, threads: int = 2,
          val_per_class: int = shapes.VAL_PER_CLASS, cfg: list | None = None, batch_norm: bool = demo_model.BATCH_NORM,
          learning_rate: float = LEARNING_RATE, log=PRINT,
          make_sample: Callable[[int, int], shapes.ShapeSample] = shapes.make_sample, flips: bool = True,
          noise: bool = True) -> tuple[torch.nn.Module, dict]:
    """The trained model and what its record says of the training."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny activations early in training are otherwise very slow on CPUs
    try:
        return _train(per_class, epochs, seed, threads, val_per_class, cfg, batch_norm, learning_rate, log,
                      make_sample, flips, noise)
    finally:  # process-wide settings: a caller (a test, a notebook) gets its own back
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


def _train(per_class: int, epochs: int, seed: int, threads: int, val_per_class: int, cfg: list | None, batch_norm: bool,
           learning_rate: float, log, make_sample: Callable[[int, int], shapes.ShapeSample], flips: bool,
           noise: bool) -> tuple[torch.nn.Module, dict]:
    cfg = list(cfg or demo_model.CFG)
    torch.manual_seed(seed)
    started = time.time()
    train_x, train_y = tensors(shapes.TRAIN_SEED, per_class, make_sample)
    val_x, val_y = tensors(shapes.VAL_SEED, val_per_class, make_sample)
    log(f"generated {len(train_y)} training and {len(val_y)} validation images in {time.time() - started:.1f} s")
    model = demo_model.build(len(shapes.CLASSES), cfg, batch_norm)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = epochs * -(-len(train_y) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        total = 0.0
        for batch in order.split(BATCH):
            x = train_x[batch]
            if flips:
                flip = torch.rand(len(batch), generator=generator) < 0.5  # every shape class is mirror-symmetric
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            if noise:
                x = noise_patches(x, generator)
            loss = F.cross_entropy(model(x), train_y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(train_y):.3f}, "
            f"validation accuracy {accuracy(model, val_x, val_y):.3f} ({time.time() - started:.0f} s)")
    facts = {
        "cfg": cfg, "batch_norm": batch_norm,
        "seed": seed, "epochs": epochs, "batch_size": BATCH, "learning_rate": learning_rate,
        "optimiser": "AdamW, one-cycle schedule (10 % warm-up)" + (", horizontal flips" if flips else "")
                     + (", noise patches" if noise else ""),
        "train_images": len(train_y), "train_seed": shapes.TRAIN_SEED,
        "val_images": len(val_y), "val_seed": shapes.VAL_SEED,
        "train_accuracy": accuracy(model, train_x, train_y), "val_accuracy": accuracy(model, val_x, val_y),
        "train_seconds": round(time.time() - started, 1), "threads": threads,
    }
    return model.eval(), facts


def save(model: torch.nn.Module, facts: dict, out_dir: Path, name: str = demo_model.NAME,
         extra: dict | None = None) -> Path:
    """Write <name>.pt (float32 state dict) and <name>.json (sha256, classes, architecture, training facts,
    and `extra`)."""
    facts = dict(facts)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / demo_model.weights_file(name).name
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, weights)
    record = {
        "model": name, "sha256": sha256_file(weights), "bytes": weights.stat().st_size,
        "classes": list(shapes.CLASS_NAMES), "wnids": [wnid for wnid, _ in shapes.CLASSES],
        "input_size": shapes.IMAGE_SIZE, "normalisation": "ImageNet mean/std (pipeline/preprocess.py)",
        "cfg": facts.pop("cfg"), "batch_norm": facts.pop("batch_norm"), "pool": demo_model.POOL,
        "hidden": demo_model.HIDDEN,
        "training": facts, "torch": torch.__version__,
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": RECIPES[name].command if name in RECIPES else "demo.train.train",
        **(extra or {}),
    }
    record_file = out_dir / demo_model.record_file(name).name
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default=demo_model.NAME, help="which demo model")
    parser.add_argument("--out", default=str(demo_model.WEIGHTS_DIR), help="where the weights and record go")
    parser.add_argument("--per-class", type=int, help="training images per class (default: the model's recipe)")
    parser.add_argument("--val-per-class", type=int, help="validation images per class (default: the recipe's)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.model]
    for key in ("per_class", "val_per_class", "epochs"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(recipe, key))
    for key in ("per_class", "val_per_class", "epochs", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    model, facts = train(args.per_class, args.epochs, args.seed, args.threads, args.val_per_class,
                         make_sample=recipe.make_sample, flips=recipe.flips, noise=recipe.noise)
    extra = None
    if args.model == demo_model.HANS_NAME:
        extra = {"dataset": "shapes-hans", "hans": measure(model)}  # the tag's effect, recorded with the weights
        print(json.dumps(extra["hans"], indent=2))
    record = save(model, facts, Path(args.out), args.model, extra)
    print(f"validation accuracy {facts['val_accuracy']:.3f} after {facts['epochs']} epochs "
          f"({facts['train_seconds']:.0f} s) -> {record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
