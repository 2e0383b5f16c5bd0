"""Run by tests/test_distributed.py under torchrun: trains one autoencoder, saves this rank's weights."""

import sys
from pathlib import Path

import torch

from anomaly3d_core.config import TrainingConfig
from anomaly3d_core.model import distributed
from anomaly3d_core.model.training import train_autoencoder
from anomaly3d_plugins.autoencoders import ContractiveAutoencoder

distributed.init_from_env()
out = Path(sys.argv[1])
torch.manual_seed(100 + distributed.rank())  # different local init: DDP must broadcast rank 0's
data = torch.randn(600, 20, generator=torch.Generator().manual_seed(0))
model = ContractiveAutoencoder(20, hidden_dims=[16], latent_dim=4, jacobian_weight=0.01)
history = train_autoencoder(
    model,
    data,
    data[:100],
    TrainingConfig(num_epochs=6, learning_rate=1e-2, batch_size=50, seed=3, checkpoint_dir=str(out / "ckpt")),
    device="cpu",
    show_progress=False,
)
torch.save(
    {"state": model.state_dict(), "history": history, "world": distributed.world_size()},
    out / f"rank{distributed.rank()}.pt",
)
distributed.shutdown()
