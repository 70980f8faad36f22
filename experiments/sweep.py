"""The label-efficiency sweep: every point of ``configs/sweep.yaml``'s grid (method x label fraction x fold x
seed) as one ``ssl_kvasir.runner.fit``, one after another here or as SLURM array tasks.

    python experiments/sweep.py data.root=DIR data.split_file=FILE [hydra/launcher=slurm] [KEY=VALUE ...]

``make pretrain DATA=DIR ...`` runs this with the make variables turned into overrides (see the README,
"Label-efficiency study"). Runs land in ``<sweep_root>/<method>/<backbone>/<budget>/fold<k>/seed<s>/``; a run
whose ``results.json`` exists is skipped, and an interrupted one resumes from its ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssl_kvasir.sweeps import run_point


@hydra.main(config_path="../configs", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_point(cfg, launcher=HydraConfig.get().launcher)


if __name__ == "__main__":
    main()
