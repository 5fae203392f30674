"""Augment a long-tailed dataset with tailfuse, then train a classifier on real + synthetic images.

    python examples/augment_and_train.py --data ../shared/data/isic2018_lt/manifest.csv --vae ../shared/models/taesd

1. `tailfuse.run` encodes the images, learns the sparse code, fuses rare-class samples and decodes them;
2. `tailfuse.datasets.AugmentedImageDataset` serves the real training images plus the synthetic ones, a synthetic
   image replacing a real one of the same tail label with probability 0.3;
3. a small classifier (a linear head on frozen EfficientNet-Lite0 features) trains on it with a class-balanced sampler
   and is scored on the real test images.
"""

import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader

import tailfuse
from tailfuse.datasets import AugmentedImageDataset, weighted_sampler
from tailfuse.evaluation.features import Backbone
from tailfuse.evaluation.metrics import average_precision
from tailfuse.store import RunStore

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True)
ap.add_argument("--vae", required=True)
ap.add_argument("--run", default="runs/example")
ap.add_argument("--per-class", type=int, default=50)
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--train-generations", type=int, default=4)
a = ap.parse_args()

result = tailfuse.run(data=a.data, run=a.run, vae=a.vae, per_class=a.per_class, generations=a.train_generations,
                      progress=False)
print(f"{result.n_images} synthetic images in {result.images}")

train = AugmentedImageDataset(a.run, split="train", synthetic_prob=0.3)
test = AugmentedImageDataset(a.run, split="test", synthetic_ratio=0)  # real test images only
multi_label = RunStore(a.run).labels()["multi_label"]
backbone = Backbone()
head = torch.nn.Linear(backbone.dim, len(train.labels))
opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
loader = DataLoader(train, batch_size=32, sampler=weighted_sampler(train))
for epoch in range(a.epochs):
    seen_synthetic = 0
    for images, y, synthetic in loader:
        logits = head(backbone(images))
        if multi_label:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)  # soft targets work too
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen_synthetic += int(synthetic.sum())
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, {seen_synthetic} synthetic images seen")

with torch.no_grad():
    outputs = [head(backbone(x)) for x, _, _ in DataLoader(test, batch_size=64)]
    scores = torch.cat([o.sigmoid() if multi_label else o.softmax(1) for o in outputs]).numpy()
y_test = test.label_matrix()
ap_per_label = average_precision(y_test, scores)
print("test AP per label:", {lab: round(float(v), 3) for lab, v in zip(test.labels, ap_per_label) if not np.isnan(v)})
