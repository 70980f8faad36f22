"""The run layer: builds, fits, predicts and analyses from composed configs.

This is the one layer that reads config objects; below it (``data``, ``models``, ``methods``, ``analysis``)
every constructor takes plain typed arguments. Imports go one way: ``run`` imports the library, never the
reverse, and within ``run`` a module imports only the modules listed before it:

    folder       the name of every file of a run; the results record, written and read here only
    guard        what a run is (its fingerprint, input files included), who holds its folder (a lock), how
                 it was interrupted
    preempt      signals during a fit: a checkpoint at the current step, then a requeue (SLURM) or an exit
    experiment   catalog, split, cache, network, DataModule and method from a config
    checkpoint   a trained method back from its checkpoint, and what it was trained with (the settings a
                 command takes from it, the data it accepts); atomic checkpoint writes; relative paths
    predict      the one prediction path (weights, device, autocast), streamed
    train        fit (a method's procedure: one stage or several), evaluate, the results record

The ``run`` package and ``folder`` import neither torch nor Lightning: the study reads results through them.
    analyze      embed, analyze, export-pseudo-labels: what is in the unlabeled pile
"""
