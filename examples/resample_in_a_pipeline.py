"""tailfuse's sampler inside an imbalanced-learn pipeline, on feature vectors (no images, no VAE needed).

    python examples/resample_in_a_pipeline.py

`TailFuseSampler` follows imbalanced-learn's resampler contract, so it drops into `imblearn.pipeline.Pipeline`
before any scikit-learn classifier: in `fit` the rare classes are over-sampled with fused samples (on a feature
matrix each row is a 1 x D grid: saliency picks the class-specific features, fusion swaps feature values between a
rare sample and a similar common one); `predict` passes the data through unchanged.
"""

import numpy as np
from imblearn.pipeline import make_pipeline
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from tailfuse import TailFuseSampler

X, y = make_classification(n_samples=1200, n_classes=3, n_informative=6, weights=[0.06, 0.24, 0.7], random_state=0)
X_tr, X_te, y_tr, y_te = train_test_split(X, y, stratify=y, test_size=0.3, random_state=0)

plain = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X_tr, y_tr)
augmented = make_pipeline(StandardScaler(), TailFuseSampler(generations=2, epochs=2, imitation_epochs=1, k=16),
                          LogisticRegression(max_iter=1000)).fit(X_tr, y_tr)
sampler = augmented.steps[1][1]
print("training counts before:", np.bincount(y_tr), "after:", {int(k): v for k, v in sampler.sampling_strategy_.items()},
      "new rows")
for name, model in (("real only", plain), ("with tailfuse", augmented)):
    print(f"{name}: balanced accuracy {balanced_accuracy_score(y_te, model.predict(X_te)):.3f}")
