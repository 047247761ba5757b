"""The PyTorch core runs alone: importing it must not pull in Ray, Optuna or MLflow."""

import subprocess
import sys


def test_core_imports_no_ray_optuna_mlflow() -> None:
    code = (
        "import sys\n"
        "import ancra_tune, ancra_tune.config, ancra_tune.data, ancra_tune.models, ancra_tune.attacks\n"
        "import ancra_tune.losses, ancra_tune.negatives, ancra_tune.trainer, ancra_tune.checkpoint\n"
        "import ancra_tune.evaluate, ancra_tune.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'optuna', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported: {out.stdout.strip()}"
