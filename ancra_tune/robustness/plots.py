"""Pictures of an evaluation: the feature histograms (paper Fig. 6) and a 2-D embedding (Figs. 4-5)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .suite import SuiteConfig


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
    method = "t-SNE"
    try:
        import umap  # type: ignore[import-not-found]

        emb = umap.UMAP(random_state=cfg.seed).fit_transform(data)
        method = "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        emb = TSNE(n_components=2, random_state=cfg.seed, init="pca",
                   perplexity=float(min(30, max(2, (2 * m - 1) // 3)))).fit_transform(data)
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
