"""The label-efficiency sweep: every point of ``configs/sweep.yaml``'s grid (method x label fraction x fold x
seed) as one ``ssl_kvasir.run.train.fit``, each in its own process here or as SLURM array tasks.

    python experiments/sweep.py data.root=DIR data.split_file=FILE [hydra/launcher=slurm] [KEY=VALUE ...]

``make pretrain DATA=DIR ...`` runs this with the make variables turned into overrides (see the README,
"Label-efficiency study"). Runs land in ``<sweep_root>/<method>/<backbone>/<budget>/fold<k>/seed<s>/``; a run
whose ``results.json`` exists, or that a live job holds (``job.json``), is not launched again, and an
interrupted one resumes from its ``checkpoints/last.ckpt``. The launchers are in ``hydra_plugins/`` beside this
script (``ssl_kvasir_launchers.py``); with ``hydra.mode=RUN`` this script runs one point alone, which is how the
local launcher starts each point.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssl_kvasir.study.sweeps import run_point


@hydra.main(config_path="../configs", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_point(cfg, launcher=HydraConfig.get().launcher)


if __name__ == "__main__":
    main()
