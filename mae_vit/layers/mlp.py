"""The Transformer MLP: one hidden layer with GELU (ViT paper, eq. 3)."""

from torch import nn


class Mlp(nn.Module):
    """(..., D) -> (..., hidden) -> GELU -> (..., D). Keys `fc1`, `fc2` as in official checkpoints."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
