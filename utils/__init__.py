"""The machinery around the model, in layers whose imports point one way (down):

- ``utils.cli``: the flows behind ``opqn_main.py`` (train, evaluate, search), option checks,
  result files and pictures;
- ``utils.comparison``: the comparison protocol of ``python -m utils.comparison``;
- ``utils.training``: the training loop, schedules, precise BN, per-method optimiser defaults;
- ``utils.retrieval``: encoding, the ADC ranking engine and metrics, faiss and IVF indexes,
  gallery indexes and shards;
- ``utils.checkpoints``: checkpoint files, the authors' format, model loading;
- shared modules: ``errors``, ``atomic_io``, ``logger``, ``runtime`` (device, processes) and
  ``precision`` (autocast).

``data``, ``models`` and ``losses`` import nothing from here.
"""
