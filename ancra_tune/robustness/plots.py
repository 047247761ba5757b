"""Pictures of an evaluation: the feature histograms (paper Fig. 6) and a 2-D embedding (Figs. 4-5)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .report import BatchResult, EvalReport, merged_features
from .suite import SuiteConfig


def draw_report(report: EvalReport, results: Sequence[BatchResult], out_dir: Path) -> EvalReport:
    """``report`` with its figures drawn into ``out_dir``: the feature histograms and embedding (when
    the evaluation kept features) and the robustness card; their paths are its artifacts."""
    from dataclasses import replace

    artifacts: list[str] = []
    merged = merged_features(results, report.suite)
    if merged is not None:
        fn, fa, labels, pairs = merged
        artifacts += plot_features(pairs, fn, fa, labels, out_dir, report.suite)
    report = replace(report, artifacts=tuple(artifacts))
    return replace(report, artifacts=(*report.artifacts, robustness_card(report, out_dir)))


def plot_features(pairs: dict[str, Tensor], feat_nat: Tensor, feat_adv: Tensor, labels: Tensor, out_dir: Path,
                  cfg: SuiteConfig) -> list[str]:
    """Histograms of the pair statistics (paper Fig. 6) and a 2-D embedding (Figs. 4-5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    titles = {"np_cos": "Exclusion: cosine(x, x_other)", "np_l2": "Exclusion: L2(x, x_other)",
              "pp_cos": "Alignment: cosine(x, x_adv)", "pp_l2": "Alignment: L2(x, x_adv)"}
    for ax, key in zip(axes.flat, ("np_cos", "np_l2", "pp_cos", "pp_l2"), strict=True):
        ax.hist(pairs[key].numpy(), bins=40, color="tab:blue" if key.startswith("pp") else "tab:red")
        ax.set_title(titles[key])
        ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(out_dir / "features_hist.png", dpi=110)
    plt.close(fig)

    m = min(cfg.embedding_max, feat_nat.shape[0])
    data = torch.cat([feat_nat[:m], feat_adv[:m]]).numpy()
    emb, method = _embed(data, cfg, m)
    lab = labels[:m].numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    sc = ax.scatter(emb[:m, 0], emb[:m, 1], c=lab, cmap="tab10", s=12, marker="o", label="natural")
    ax.scatter(emb[m:, 0], emb[m:, 1], c=lab, cmap="tab10", s=14, marker="x", label="adversarial")
    ax.legend(loc="best")
    ax.set_title(f"{method} of features: natural (o) and PGD-{cfg.pgd_steps} adversarial (x)")
    fig.colorbar(sc, ax=ax, label="class")
    fig.tight_layout()
    fig.savefig(out_dir / "embedding.png", dpi=110)
    plt.close(fig)
    return ["features_hist.png", "embedding.png"]


def _embed(data: np.ndarray, cfg: SuiteConfig, m: int) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``data`` and the method's name (``cfg.embedding``)."""
    if cfg.embedding == "pca":
        centered = data - data.mean(axis=0, keepdims=True)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        return centered @ vt[:2].T, "PCA"
    try:
        import umap  # type: ignore[import-not-found]

        return umap.UMAP(random_state=cfg.seed).fit_transform(data), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, random_state=cfg.seed, init="pca",
                    perplexity=float(min(30, max(2, (2 * m - 1) // 3)))).fit_transform(data), "t-SNE"


GROUPS = (("final", "P' (final output)"), ("aux", "P (auxiliary)"), ("adaptive", "adaptive (RA gate)"),
          ("black-box", "black-box"), ("source", "transfer"), ("autoattack", "AutoAttack"))
_COLORS = {"final": "tab:blue", "aux": "tab:cyan", "adaptive": "tab:purple", "black-box": "tab:orange",
           "source": "tab:brown", "autoattack": "tab:green"}


def _group(kind: str, target: str) -> str:
    if kind == "autoattack":
        return "autoattack"
    if target in ("sum", "labelgate", "stgate", "softgate"):
        return "adaptive"
    return target


def robustness_card(report: EvalReport, out_dir: Path) -> str:
    """One picture of a model's robustness: accuracy under each attack grouped by what it attacked,
    the clean accuracy and the worst case drawn as lines, attacks another beats marked, and the
    masking checks' verdicts listed. Returns the file name (``robustness_card.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out_dir.mkdir(parents=True, exist_ok=True)
    attacks = [a for a in report.attacks if a.in_worst_case]
    order = {g: i for i, (g, _) in enumerate(GROUPS)}
    attacks.sort(key=lambda a: (order[_group(a.kind, a.target)], -a.accuracy))
    n = len(attacks)
    fig = plt.figure(figsize=(13, max(5.0, 0.32 * n + 2.2)))
    ax = fig.add_axes((0.2, 0.17, 0.43, 0.75))
    ys = list(range(n))[::-1]
    for y, a in zip(ys, attacks, strict=True):
        g = _group(a.kind, a.target)
        ax.barh(y, a.accuracy, color=_COLORS[g], hatch="//" if a.beaten_by else None, edgecolor="white")
        ax.text(a.accuracy + 0.005, y, f"{a.accuracy:.3f}", va="center", fontsize=8)
    ax.set_yticks(ys, [a.name for a in attacks], fontsize=8)
    ax.axvline(report.clean_acc, color="black", lw=1.2, label=f"clean {report.clean_acc:.3f}")
    ax.axvline(report.robust_acc_worst, color="red", lw=2, ls="--", label=f"worst case {report.robust_acc_worst:.3f}")
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("accuracy of the real prediction P' on each attack's examples")
    handles = [Patch(color=_COLORS[g], label=label) for g, label in GROUPS
               if any(_group(a.kind, a.target) == g for a in attacks)]
    handles += ax.get_legend_handles_labels()[0]
    handles.append(Patch(facecolor="lightgray", hatch="//", edgecolor="white",
                         label="hatched: another attack is stronger (overestimates)"))
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.2, 0.0), ncol=3, fontsize=8, frameon=False)
    meta = report.meta
    title = (f"{meta.get('model', 'model')} on {meta.get('dataset', '?')} ({meta.get('split', 'val')}), "
             f"eps {report.eps:.4g}, {report.n_examples} examples, {report.suite.preset} preset")
    ax.set_title(title, fontsize=10)
    text = fig.add_axes((0.68, 0.17, 0.31, 0.75))
    text.axis("off")
    lines = [("gradient-masking checks", "black", "bold")]
    for c in report.checks:
        color = {True: "tab:green", False: "tab:red", None: "gray"}[c.passed]
        lines.append((f"{c.verdict.upper():<5} {c.name} [{c.scope}]", color, "normal"))
    flags = report.flags("robust_acc_worst")
    lines.append(("", "black", "normal"))
    if flags:
        lines.append(("FLAGGED: the worst case is not credible", "tab:red", "bold"))
        lines += [(f"  {f}", "tab:red", "normal") for f in flags]
    elif not report.checks_passed:
        lines.append(("worst case stands; P'-only numbers flagged", "tab:orange", "bold"))
    else:
        lines.append(("every check passes", "tab:green", "bold"))
    for i, (line, color, weight) in enumerate(lines):
        text.text(0, 1 - i * 0.045, line, color=color, fontsize=8.5, weight=weight, family="monospace",
                  va="top", transform=text.transAxes)
    path = out_dir / "robustness_card.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
