"""Applications over trained runs: evaluate, sweep, visualize, and the Fashion-MNIST chain."""
