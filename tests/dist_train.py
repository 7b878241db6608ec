"""Entry point for tests/test_dist.py: `torchrun ... tests/dist_train.py CONFIG.yaml`."""

import sys

from saelab.train.trainer import TrainConfig, train

if __name__ == "__main__":
    train(TrainConfig.load(sys.argv[1]), progress=False)
