"""eabench command line: `python run.py [experiment=NAME] [overrides]`, `python run.py -m ...` for sweeps.

An experiment whose file defines a sweep (hydra.sweeper.params) runs as a multirun even without
-m, so `python run.py` is the whole quickstart; reports are written when the run or sweep ends.
"""

import sys

import hydra
from omegaconf import DictConfig

from harness.cli import ensure_multirun_for_sweeps, run_from_hydra


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    return run_from_hydra(cfg)


if __name__ == "__main__":
    sys.argv = ensure_multirun_for_sweeps(sys.argv)
    main()
