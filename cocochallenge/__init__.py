"""The library of the MS COCO multi-label classification challenge, one module per concern.

``helpers.py`` beside this package holds the course's provided building blocks (the two
datasets, ``train_loop``, ``validation_loop``, ``update_graphs``); the notebooks glue them
together with the pieces here. Modules import downward only, in this order::

    config, files            constants, environment settings, atomic files
    demo                     the offline demo dataset generator
    data, split, transforms  layout checks, labels, start-up scan, the split, loaders
    models, losses, budget   backbone registry and offline weights, heads, ASL, GPU hours
    metrics                  the leaderboard's F1, standard metrics, thresholds
    training, checkpoints    one epoch, one evaluation, cached features, resumable phases
    runs, submission, handin the run folder, model comparison, the JSON, the Moodle zip
    analysis, plots          tables and figures of analysis.ipynb
    cli                      ``python -m cocochallenge ...``

Importing the package has no side effects: nothing is downloaded, written or printed.
"""

__version__ = "0.2.0"
