"""Train state, optimizers, the train step and the training loops (online and offline)."""
