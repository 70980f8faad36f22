"""The run layer: builds, fits, predicts and analyses from composed configs.

This is the one layer that reads config objects; below it (``data``, ``models``, ``methods``, ``analysis``)
every constructor takes plain typed arguments. Imports go one way: ``run`` imports the library, never the
reverse, and within ``run`` a module imports only the modules listed before it:

    guard        what a run is (its fingerprint), who holds its folder (a lock), how it was interrupted
    preempt      SLURM pre-emption and time limits: a checkpoint at the current step, then a requeue
    experiment   catalog, split, cache, network, DataModule and method from a config
    checkpoint   a trained method back from its checkpoint; atomic checkpoint writes
    predict      the one prediction path (weights, device, autocast), streamed
    train        fit (a method's procedure: one stage or several), evaluate, results.json
    analyze      embed, analyze, export-pseudo-labels: what is in the unlabeled pile
"""
