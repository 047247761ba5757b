"""ancra-tune: ANCRA adversarial training (asymmetric negative contrast + reverse attention).

The core (config, data, models, attacks, losses, negatives, trainer) is pure PyTorch and
imports no Ray, Optuna or MLflow.
"""

from .config import ConfigError, TrainConfig

__version__ = "0.1.0"

__all__ = ["ConfigError", "TrainConfig", "__version__"]
