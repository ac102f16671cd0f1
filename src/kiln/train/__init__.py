"""Training: the packed loader, optimizer and schedule, checkpoints, the pretraining loop."""
