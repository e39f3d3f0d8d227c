"""Training on several processes: torchrun, a DeviceMesh, FSDP2, expert and pipeline parallelism,
distributed checkpoints. Applied to a built single-device Transformer from outside; see
parallelize.py for the order, mesh.py for the layout, trainer.py for the training loop."""
