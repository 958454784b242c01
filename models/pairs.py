"""LFW pairs files and the verification metrics used by the model scripts (numpy only)."""

from __future__ import annotations

import os

import numpy as np


def read_pairs(path: str):
    """Standard LFW pairs file -> (folds, [(path_a, path_b, same, fold)]); paths like Name/Name_0001.jpg."""
    with open(path) as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    head = lines[0].split()
    n_folds, per = int(head[0]), int(head[1])
    out = []

    def img(name, i):
        return os.path.join(name, f"{name}_{int(i):04d}.jpg")

    for k, ln in enumerate(lines[1:]):
        p = ln.split("\t") if "\t" in ln else ln.split()
        fold = k // (2 * per)
        if len(p) == 3:
            out.append((img(p[0], p[1]), img(p[0], p[2]), 1, fold))
        elif len(p) == 4:
            out.append((img(p[0], p[1]), img(p[2], p[3]), 0, fold))
        else:
            raise ValueError(f"bad pairs line: {ln!r}")
    return n_folds, out


def accuracy_at(scores, labels, t) -> float:
    return float(((scores >= t) == (labels == 1)).mean())


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold maximising accuracy (same if score >= t), placed midway between scores."""
    s = np.sort(np.unique(scores))
    cands = np.concatenate([[s[0] - 1e-4], (s[:-1] + s[1:]) / 2, [s[-1] + 1e-4]])
    accs = [accuracy_at(scores, labels, t) for t in cands]
    i = int(np.argmax(accs))
    return float(cands[i]), float(accs[i])


def kfold_accuracy(scores, labels, folds, n_folds):
    accs = []
    for k in range(n_folds):
        tr, te = folds != k, folds == k
        t, _ = best_threshold(scores[tr], labels[tr])
        accs.append(accuracy_at(scores[te], labels[te], t))
    return float(np.mean(accs)), float(np.std(accs)), accs


def far_threshold(impostor_scores: np.ndarray, far: float) -> float:
    """Lowest threshold whose false-accept rate on these impostor pairs is <= far."""
    s = np.sort(impostor_scores)[::-1]
    k = int(np.floor(far * len(s)))  # impostors allowed at or above the threshold
    if k >= len(s):
        return float(s[-1])
    # just above the (k+1)-th highest impostor score: at most k impostors accepted
    return float(np.nextafter(np.float32(s[k]), np.float32(np.inf)))


def roc_auc(scores, labels) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tar_at_far(scores, labels, far):
    t = far_threshold(scores[labels == 0], far)
    return float((scores[labels == 1] >= t).mean()), t


def report(scores, labels, folds, n_folds) -> dict:
    mean, std, accs = kfold_accuracy(scores, labels, folds, n_folds)
    t, acc_all = best_threshold(scores, labels)
    tar2, t2 = tar_at_far(scores, labels, 1e-2)
    tar3, t3 = tar_at_far(scores, labels, 1e-3)
    return {"accuracy": mean, "accuracy_std": std, "fold_accuracies": accs,
            "best_threshold": t, "best_threshold_accuracy": acc_all, "auc": roc_auc(scores, labels),
            "tar_far_1e-2": tar2, "threshold_far_1e-2": t2, "tar_far_1e-3": tar3, "threshold_far_1e-3": t3}
