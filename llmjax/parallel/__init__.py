"""How a run spreads over devices and processes (the model knows nothing of this).

    sharding.py     the mesh, logical-axis rule presets, placing state and batches,
                    gathering arrays to the host
    distributed.py  multi-host start-up (jax.distributed) and preemption
"""
