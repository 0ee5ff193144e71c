"""Will it fit and how fast: TPU fit checks and rooflines."""
