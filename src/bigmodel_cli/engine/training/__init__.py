"""Training: the job (``job``: TrainConfig → checked data, model and task), the one training loop and
its run directory (``loop``), checkpoints for bit-exact resume (``checkpoint``), data-parallel ranks
inside a worker (``distributed``) and the --nproc launcher (``launcher``)."""
