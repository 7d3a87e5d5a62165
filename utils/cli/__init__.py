"""The flows behind ``opqn_main.py``: ``pipeline.run_training`` and ``run_evaluation``,
``search.run_search``; what they take (``settings``), the option checks done before any work
(``validation``, ``checkpoint_checks``, ``data_folders``), and what they write (``reporting``:
result files and PR curves; ``gallery_view``: retrieval pictures).

Nothing is imported here: ``opqn_main.py --help`` and usage errors need only ``validation``.
"""
