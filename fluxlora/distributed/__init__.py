"""Several processes: the bounded DDP strategy, starting and ending local ranks, naming a missing rank."""
