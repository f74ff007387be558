"""The main job, apart from the engine: data, the engine's nets, the training loop, checkpoints, the report and
the ``edropout prune`` command line."""
