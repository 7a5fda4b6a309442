"""Suite-wide settings."""

import torch

# One torch thread for the whole suite: on a shared two-core CPU a second OpenMP thread mostly
# spins at barriers (5-25x slower training steps measured here).
torch.set_num_threads(1)
